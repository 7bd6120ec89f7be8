"""Facts about the model families the toolkit trains. In memory everything uses diffusers names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["sd1", "sd2", "sdxl", "sd3"]
# "flow": rectified flow (the model predicts noise - data; SD3, arXiv 2403.03206 sec. 2), read from the scheduler
# class (FlowMatchEulerDiscreteScheduler), never from a DDPM prediction_type.
PredictionType = Literal["epsilon", "v_prediction", "flow"]


@dataclass(frozen=True)
class FamilyFacts:
    """What the code reads per family; everything else a family is comes from its model's own configs."""

    name: Family
    resolution: int  # largest native training side of the family in pixels; a model's own: native_resolution()
    ss_base_model_version: str  # kohya `ss_base_model_version` for epsilon models (SD3: per variant, SD3_VARIANTS)
    label: str
    # Flow-matching transformers (SD3 today; Flux, SANA, ... next) keep their denoiser in another diffusers
    # subfolder; the default is the UNet families'.
    denoiser: str = "unet"  # diffusers subfolder of the denoiser: "unet" (UNet2DConditionModel) or "transformer"


FAMILIES: dict[str, FamilyFacts] = {
    "sd1": FamilyFacts("sd1", 512, "sd_v1", "Stable Diffusion 1.x"),
    "sd2": FamilyFacts("sd2", 768, "sd_v2", "Stable Diffusion 2.x"),
    "sdxl": FamilyFacts("sdxl", 1024, "sdxl_base_v1-0", "Stable Diffusion XL"),
    # SD3 / SD3.5 (Esser et al., arXiv 2403.03206): MMDiT on a 16-channel VAE (latents = (z - 0.0609) * 1.5305,
    # the released vae/config.json), CLIP-L + CLIP-G (both with projection) + T5-XXL, where T5 may be dropped
    # (sec. 5.3.3: "removing T5 at inference"; diffusers' StableDiffusion3Pipeline zeroes its 4096-wide tokens).
    # Flow shift 3.0: the released scheduler_config.json and sd-scripts' sd3_train_network.get_noise_scheduler.
    # These live in the bundled configs (library/models/configs/sd3*), which the code reads; ss_base_model_version
    # is the variant's (SD3_VARIANTS: "medium" is sd-scripts' value for the SD3 Medium layout). LoRA layouts:
    # library/networks/sd3_keys.py.
    "sd3": FamilyFacts("sd3", 1024, "medium", "Stable Diffusion 3 / 3.5", denoiser="transformer"),
}


@dataclass(frozen=True)
class SD3Variant:
    """One released SD3-family layout: its bundled config folder and the names sd-scripts writes for it."""

    config: str  # folder under library/models/configs
    ss_base_model_version: str  # sd-scripts: `mmdit.model_type` from library/sd3_utils.analyze_state_dict_state
    architecture: str  # modelspec.architecture (sd-scripts sai_model_spec: "stable-diffusion-3-" + model_type)
    label: str


SD3_VARIANTS: dict[str, SD3Variant] = {
    "sd3_medium": SD3Variant("sd3_medium", "medium", "stable-diffusion-3-medium", "SD3 Medium"),
    "sd35_medium": SD3Variant("sd35_medium", "5-medium", "stable-diffusion-3-5-medium", "SD3.5 Medium"),
    "sd35_large": SD3Variant("sd35_large", "5-large", "stable-diffusion-3-5-large", "SD3.5 Large"),
}


def sd3_variant(transformer_config: dict) -> str:
    """Which SD3 layout a transformer config describes, by sd-scripts' rule (analyze_state_dict_state): no q/k
    norm -> SD3 Medium; q/k norm with dual-attention (MMDiT-X) layers -> SD3.5 Medium; q/k norm alone -> SD3.5
    Large. Tiny test models follow the same rule."""
    if not transformer_config.get("qk_norm"):
        return "sd3_medium"
    return "sd35_medium" if transformer_config.get("dual_attention_layers") else "sd35_large"


def native_resolution(family: str, prediction_type: str, unet_sample_size: int | None = None,
                      vae_scale_factor: int = 8) -> int:
    """The side (pixels) a model of `family` was trained at, which `data.resolution = 0` and the resolution shift use.

    The model's own config says it best: diffusers' UNet `sample_size` is the latent side of the training images
    (its pipelines generate at `sample_size * vae_scale_factor` by default): 64 -> 512 for SD 1.x and SD 2.x-base,
    96 -> 768 for SD 2.x-768-v, 128 -> 1024 for SDXL. Without a config (`unet_sample_size` None or 0) SD2 is told
    apart by its prediction type, as Stability released it: the 512 px base models predict epsilon, the 768 px
    models v (stabilityai/stable-diffusion-2-base vs stable-diffusion-2 / 2-1 model cards); SD1 and SDXL have one
    native side each (`FAMILIES[family].resolution`).
    """
    if isinstance(unet_sample_size, (list, tuple)):  # diffusers allows (height, width)
        unet_sample_size = max(unet_sample_size)
    if unet_sample_size:
        return int(unet_sample_size) * vae_scale_factor
    if family == "sd2":
        return 768 if prediction_type == "v_prediction" else 512
    return FAMILIES[family].resolution


def native_resolution_of_folder(family: str, config_dir) -> int:
    """`native_resolution` read from a diffusers folder's configs (unet/config.json, vae/config.json,
    scheduler/scheduler_config.json); what a dry run and the estimate use, as they never load weights.
    A missing file leaves that fact to the family rule (no sample size, epsilon, /8 VAE)."""
    import json
    from pathlib import Path

    def read(name: str) -> dict:
        path = Path(config_dir or ".") / name
        return json.loads(path.read_text(encoding="utf-8")) if config_dir and path.is_file() else {}

    vae_levels = len(read("vae/config.json").get("block_out_channels", (0, 0, 0, 0)))
    scheduler = read("scheduler/scheduler_config.json")
    denoiser = getattr(FAMILIES.get(family), "denoiser", "unet")  # SD3: transformer/config.json
    return native_resolution(family, scheduler.get("prediction_type", "epsilon"),
                             read(f"{denoiser}/config.json").get("sample_size"), 2 ** (vae_levels - 1))
