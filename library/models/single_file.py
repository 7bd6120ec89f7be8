"""Single-file checkpoints (CompVis LDM for SD1/SD2, Stability SGM for SDXL): load into an `SDModel`, save one.

Load: the file's keys are read first (safetensors header, or a weights-only pickle), the family is detected from
the text-encoder prefixes, the model is built from a diffusers config folder with empty weights, and every tensor
is mapped through the strict key maps (`keymaps*.py`), shape-checked against the model and assigned.

Prediction type, in order (the file cannot always tell, so the config wins):
1. `model.prediction_type` / `model.v_parameterization` in the config;
2. a `v_pred` key in the file (the marker ComfyUI reads, written by v-prediction SDXL releases such as NoobAI-XL);
3. safetensors metadata `modelspec.prediction_type` ("v" / "epsilon", written by sd-scripts and by us);
4. SD2 only: ComfyUI's test (`supported_models.SD20.model_type`): v-prediction when the population std of
   `output_blocks.11.1.transformer_blocks.0.norm1.bias` exceeds 0.09 (separates the 768-v and 512-base releases);
   a file without that key falls back to v-prediction, the SD2.x 768 default;
5. otherwise epsilon (SD1, SDXL).
A `ztsnr` key (also ComfyUI's convention) sets `extra["zero_terminal_snr"] = True` and the scheduler's
`rescale_betas_zero_snr`. We write both markers when they apply, and `modelspec.prediction_type` always.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from library.errors import ModelFileError
from library.models import keymaps_clip as kc
from library.models.families import Family
from library.models.keymaps import KeyMap, KeyMapError, from_ldm, to_ldm, unet_keymap, vae_keymap
from library.models.model import SDModel
from library.models.safe_load import SAFETENSORS_SUFFIX, TensorFile, TensorView, open_tensor_file
from library.models.single_file_write import check_single_file_target, write_single_file

SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"

# Keys of released single files that are not weights of the diffusers model; dropped on load, listed explicitly.
# Training-code buffers, listed once at load (`ignored_note`): LDM `ddpm.py` registers the noise schedule as buffers,
# `logvar` and `lvlb_weights`; the generative-models (SGM) `DiscreteDenoiser` registers `denoiser.sigmas`
# (sgm/modules/diffusionmodules/denoiser.py), which ComfyUI ignores too; `model_ema.*` holds the EMA copy the
# original trainers kept (the released weights are already the EMA ones in `-ema` files).
TRAINING_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "denoiser.sigmas",
})
NON_WEIGHT_PREFIXES = ("model_ema.",)
# Dropped without a note: the markers are read as evidence (prediction type), and CLIP's `position_ids` buffer is part
# of the text-encoder layout every released file and every file we write carries.
NON_WEIGHT_KEYS = TRAINING_BUFFERS | {V_PRED_KEY, ZTSNR_KEY, SD1_TE + kc.POSITION_IDS, SDXL_TE1 + kc.POSITION_IDS}
SD2_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def detect_family(keys: Iterable[str]) -> Family | None:
    """SDXL by `conditioner.embedders.1`, SD2 by `cond_stage_model.model.`, SD1 by `cond_stage_model.transformer`."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith(SD2_TE) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TE) for k in keys):
        return "sd1"
    return None


def model_keymaps(family: Family, unet: Any, vae: Any, text_encoders: list[Any]) -> list[tuple[str, Any, KeyMap]]:
    """(part name, module, key map) for every part of a model of `family`, in file order."""
    parts: list[tuple[str, Any, KeyMap]] = [
        ("unet", unet, unet_keymap(unet.config, unet.state_dict().keys())),
        ("vae", vae, vae_keymap(vae.config, vae.state_dict().keys())),
    ]
    te_keys = [list(kc.te_state_dict(te).keys()) for te in text_encoders]
    expected = {"sd1": 1, "sd2": 1, "sdxl": 2}[family]
    if len(text_encoders) != expected:
        raise ModelFileError(f"a {family} model has {expected} text encoder(s), this one has {len(text_encoders)}")
    match family:
        case "sd1":
            parts.append(("text_encoder", text_encoders[0], kc.clip_keymap(SD1_TE, te_keys[0])))
        case "sd2":
            parts.append(("text_encoder", text_encoders[0], kc.openclip_keymap(SD2_TE, te_keys[0])))
        case "sdxl":
            parts.append(("text_encoder", text_encoders[0], kc.clip_keymap(SDXL_TE1, te_keys[0])))
            parts.append(("text_encoder_2", text_encoders[1], kc.openclip_keymap(SDXL_TE2, te_keys[1])))
        case _:
            raise AssertionError(f"unknown family {family!r}")
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Save.


def model_to_ldm(model: SDModel) -> dict[str, torch.Tensor]:
    """The whole model as one single-file state dict (released key set, markers included), tensors as stored."""
    out: dict[str, torch.Tensor] = {}
    for name, module, km in model_keymaps(model.family, model.unet, model.vae, model.text_encoders):
        sd = kc.te_state_dict(module) if name.startswith("text_encoder") else module.state_dict()
        ldm = to_ldm(sd, km)
        out.update(ldm)
        cfg = module.config if name.startswith("text_encoder") else None
        if km.prefix in (SD1_TE, SDXL_TE1):
            out.update(kc.clip_extras_to_write(km.prefix, cfg.max_position_embeddings))
        elif km.prefix in (SD2_TE, SDXL_TE2):
            out.update(kc.openclip_extras_to_write(km.prefix, ldm, cfg.hidden_size, pad_layer=km.prefix == SD2_TE))
    if model.prediction_type == "v_prediction":
        out[V_PRED_KEY] = torch.zeros(0)
    if model.extra.get("zero_terminal_snr"):
        out[ZTSNR_KEY] = torch.zeros(0)
    return out


def save_single_file(model: SDModel, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write `model` as one `.safetensors` single file (atomic). Floating tensors are cast to `dtype` (fp32, fp16 or
    bf16); `metadata` (str -> str) goes into the header, plus `modelspec.prediction_type` unless given."""
    if model.family == "sd3":  # the SD3 layout has its own key maps (library/models/sd3/single_file.py)
        from library.models.sd3.single_file import save_sd3_single_file

        return save_sd3_single_file(model, path, dtype=dtype, metadata=metadata)
    path = Path(path)
    meta = check_single_file_target(path, dtype, metadata)
    meta.setdefault("modelspec.prediction_type", "v" if model.prediction_type == "v_prediction" else "epsilon")
    write_single_file(path, model_to_ldm(model), dtype, meta)


# ---------------------------------------------------------------------------------------------------------------
# Load.


def load_single_file(path: str | os.PathLike, cfg: Any) -> SDModel:
    """Load a single-file SD1/SD2/SDXL checkpoint (`cfg`: a `ModelConfig`). Tensors keep the file's dtype."""
    f = _read_whole(open_tensor_file(path))
    family = detect_family(f.keys())
    if family is None:
        raise ModelFileError(f"{f.path}: not an SD1/SD2/SDXL single file: no text-encoder keys "
                             f"({SD1_TE}*, {SD2_TE}* or conditioner.embedders.1.*)")
    forced = cfg.resolved_family()
    if forced is not None and forced != family:
        raise ModelFileError(f"{f.path}: model.family = '{forced}' but the file holds an {family} model "
                             f"(its keys start with {_family_marker(family)}); set model.family = '{family}' or 'auto'")
    prediction = detect_prediction(f, family, cfg.resolved_prediction_type())
    config_dir = _config_dir(cfg, family, prediction)
    unet, vae, text_encoders, tokenizers = _build_empty(config_dir, family, f.path)
    parts = model_keymaps(family, unet, vae, text_encoders)
    view = _view_for_mapping(f, family, parts)
    for name, module, km in parts:
        try:
            _check_shapes(view, module, name, km, f.path)
            sd = from_ldm(view, km)
        except KeyMapError as e:
            raise ModelFileError(f"{f.path}: {e}") from e
        if name.startswith("text_encoder"):
            sd = kc.te_module_keys(module, sd)
        module.load_state_dict(sd, strict=True, assign=True)
        module.eval()
    sched = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    sched["prediction_type"] = prediction
    ztsnr = ZTSNR_KEY in f
    if ztsnr:
        sched["rescale_betas_zero_snr"] = True
    return SDModel(family=family, prediction_type=prediction, unet=unet, vae=vae, text_encoders=text_encoders,
                   tokenizers=tokenizers, scheduler_config=sched, source=str(path), config_dir=config_dir,
                   extra={"zero_terminal_snr": ztsnr, "file_metadata": dict(f.metadata)})


def _read_whole(f: TensorFile) -> TensorFile:
    """A safetensors file's tensors read into memory torch owns (library/models/meta_load.py `read_safetensors`),
    not `safe_open`'s views of a memory map: every weight is read anyway, the file's pages would stay mapped (and
    counted in the process's memory) beside any cast copy (fp16 file -> fp32 weights: 3x the file instead of 2x),
    and torch-allocated memory is 64-byte aligned, as the in-memory model's (identical outputs)."""
    if f.path.suffix.lower() != SAFETENSORS_SUFFIX:
        return f  # pickles are already in memory
    from library.models.meta_load import read_safetensors

    return TensorFile(f.path, f.shapes, f.metadata, read_safetensors(f.path))


def detect_prediction(f: Mapping[str, Any], family: Family, forced: str | None) -> str:
    """See the module docstring for the order of evidence. `f`: the file's tensors (a TensorFile or a dict)."""
    if forced is not None:
        return forced
    if V_PRED_KEY in f:
        return "v_prediction"
    spec = getattr(f, "metadata", {}).get("modelspec.prediction_type")
    if spec in ("v", "v_prediction"):
        return "v_prediction"
    if spec == "epsilon":
        return "epsilon"
    if family == "sd2":
        if SD2_V_PROBE in f:
            return "v_prediction" if float(f[SD2_V_PROBE].float().std(unbiased=False)) > 0.09 else "epsilon"
        return "v_prediction"
    return "epsilon"


def _family_marker(family: Family) -> str:
    return {"sd1": SD1_TE, "sd2": SD2_TE, "sdxl": "conditioner.embedders.1."}[family]


def _config_dir(cfg: Any, family: Family, prediction: str) -> Path:
    from library.models.configs import bundled_config_for

    if not cfg.config_dir:
        return bundled_config_for(family, prediction)
    d = Path(cfg.config_dir)
    if not (d / "unet" / "config.json").is_file():
        raise ModelFileError(f"model.config_dir = '{d}' is not a diffusers config folder (no unet/config.json)")
    return d


def _build_empty(config_dir: Path, family: Family, path: Path) -> tuple[Any, Any, list[Any], list[Any]]:
    """Modules from the config folder with parameters on the meta device (buffers real), filled by the loader."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    te_classes = [CLIPTextModel] if family != "sdxl" else [CLIPTextModel, CLIPTextModelWithProjection]
    te_dirs = ["text_encoder", "tokenizer"], ["text_encoder_2", "tokenizer_2"]
    try:
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
            tes = [cls(CLIPTextConfig.from_pretrained(config_dir / d[0])) for cls, d in zip(te_classes, te_dirs)]
        toks = [CLIPTokenizer.from_pretrained(config_dir / d[1]) for d in te_dirs[: len(te_classes)]]
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot build the model from the config folder {config_dir} ({e})") from e
    return unet, vae, tes, toks


def _view_for_mapping(f: TensorFile, family: Family, parts: list[tuple[str, Any, KeyMap]]) -> TensorView:
    """Drop the listed non-weight extras, normalise old SD1 text-encoder keys, and reject any key left unmapped."""
    ignored = set(NON_WEIGHT_KEYS)
    for name, module, km in parts:
        if km.prefix in (SD2_TE, SDXL_TE2):
            layers = kc.n_layers(kc.te_state_dict(module).keys())
            ignored.update(kc.openclip_extras_to_ignore(km.prefix, f.keys(), layers, sd2=km.prefix == SD2_TE))
    names: dict[str, str] = {}
    dropped: list[str] = []
    for key in f.keys():
        if key in TRAINING_BUFFERS or key.startswith(NON_WEIGHT_PREFIXES):
            dropped.append(key)
            continue
        if key in ignored:
            continue
        new = key
        if family == "sd1" and key.startswith(SD1_TE) and not key.startswith(SD1_TE + kc.TEXT_MODEL):
            new = SD1_TE + kc.TEXT_MODEL + key[len(SD1_TE):]  # transformers < 4.? saved CLIP without `text_model.`
        if new in ignored:
            continue
        names[new] = key
    known = {k for _, _, km in parts for k in km.ldm_keys()}
    stray = [names[k] for k in names if k not in known]
    if stray:
        raise ModelFileError(f"{f.path}: unexpected key '{stray[0]}' ({len(stray)} keys no {family} model has); "
                             "is this a model of another kind (inpainting, refiner, ControlNet) or a wrong family?")
    if dropped:
        print(ignored_note(f.path, dropped), file=sys.stderr)
    return TensorView(f, names)


def ignored_note(path: Path, dropped: list[str]) -> str:
    """One line naming the training-code buffers and EMA copy a file carried and the loader left out."""
    ema = [k for k in dropped if k.startswith(NON_WEIGHT_PREFIXES)]
    named = sorted(k for k in dropped if not k.startswith(NON_WEIGHT_PREFIXES))
    if ema:
        named.append(f"model_ema.* ({len(ema)} keys: the EMA copy kept by the original trainer)")
    return (f"note: {path}: left out {len(dropped)} keys that are not weights of the model (noise-schedule buffers "
            f"of the code that trained it, EMA copies): {', '.join(named)}")


def _check_shapes(view: TensorView, module: Any, name: str, km: KeyMap, path: Path) -> None:
    """Compare each file tensor's stored shape (from the header) with the shape the config's model expects."""
    sd = kc.te_state_dict(module) if name.startswith("text_encoder") else module.state_dict()
    meta = {k: v.to("meta") for k, v in sd.items()}
    for key, want in to_ldm(meta, km).items():
        if key not in view.names:
            raise ModelFileError(f"{path}: missing key '{key}' (the file does not hold a complete {name})")
        have = tuple(view.shape(key))
        ok = have == tuple(want.shape) or (want.dim() == 4 and have == tuple(want.shape[:2]))  # 1x1 conv as linear
        if not ok:
            raise ModelFileError(f"{path}: key '{view.names[key]}' has shape {list(have)} but the {name} of the "
                                 f"config in use expects {list(want.shape)} (wrong config_dir or family?)")
