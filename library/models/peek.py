"""What a base model is, from its configs and file header only (no weights read): the one home of family and
prediction-type detection before loading, used by the run plan, `--dry-run` and DreamBooth's class-image size."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from library.errors import ModelFileError


@dataclass(frozen=True)
class ModelPeek:
    family: str
    config_dir: Path | None  # a diffusers-format folder with the model's configs (bundled for single files)
    prediction_type: str | None  # None: only the weights can tell (an SD2 single file without markers)
    unet_sample_size: int | None = None  # latent side the denoiser was configured for (diffusers `sample_size`)
    vae_scale_factor: int = 8

    @property
    def native_resolution(self) -> int:
        from library.models.families import native_resolution

        return native_resolution(self.family, self.prediction_type or "epsilon", self.unet_sample_size,
                                 self.vae_scale_factor)


def peek_model(model_cfg) -> ModelPeek:
    """Family, config folder and (where the headers tell) prediction type of the configured base model."""
    from library.models.configs import bundled_config_for
    from library.models.tiny import parse_tiny_ref, resolve_model_ref

    from library.models.sd3.peek import peek_sd3

    sd3 = peek_sd3(model_cfg)  # SD3 / SD3.5 folders, single files and tiny:sd3 (their own configs and key names)
    if sd3 is not None:
        return ModelPeek(*sd3)
    ref = model_cfg.pretrained_model_name_or_path.strip()
    forced_family, forced_pred = model_cfg.resolved_family(), model_cfg.resolved_prediction_type()
    if ref.startswith("tiny:"):
        folder = resolve_model_ref(ref)
        return _from_folder(folder, forced_family or parse_tiny_ref(ref).family, forced_pred)
    path = Path(ref).expanduser()
    if path.is_dir():
        return _from_folder(path, forced_family, forced_pred)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from library.models.safe_load import read_safetensors_header
        from library.models.single_file import V_PRED_KEY, detect_family

        shapes, metadata = read_safetensors_header(path)
        family = forced_family or detect_family(shapes)
        if family is None:
            raise ModelFileError(f"{path}: not a Stable Diffusion single file (no known text-encoder keys)")
        prediction = forced_pred or _header_prediction(family, V_PRED_KEY in shapes, metadata)
    elif path.is_file() and forced_family:
        family, prediction = forced_family, forced_pred  # a .ckpt is a pickle: reading its keys means loading it
    else:
        raise ModelFileError(f"model.pretrained_model_name_or_path: {ref} does not exist or is not a folder / "
                             ".safetensors file (for a .ckpt, set model.family)")
    config_dir = Path(model_cfg.config_dir) if model_cfg.config_dir else bundled_config_for(
        family, prediction or "v_prediction")
    peek = _from_folder(config_dir, family, prediction)
    return ModelPeek(family, config_dir, prediction, peek.unet_sample_size, peek.vae_scale_factor)


def needs_weights(model_cfg) -> bool:
    """A pickle checkpoint (.ckpt, .pt, ...) with no model.family: its keys can only be read by loading it (with
    weights_only), so the run loads it first and peeks at the loaded model (`peek_loaded`)."""
    ref = model_cfg.pretrained_model_name_or_path.strip()
    path = Path(ref).expanduser()
    return (not ref.startswith("tiny:") and path.is_file() and path.suffix.lower() != ".safetensors"
            and not model_cfg.resolved_family())


def peek_loaded(model) -> ModelPeek:
    """The same facts, from a loaded SDModel."""
    peek = _from_folder(model.config_dir, model.family, model.prediction_type)
    return ModelPeek(model.family, model.config_dir, model.prediction_type, peek.unet_sample_size,
                     peek.vae_scale_factor)


def _from_folder(folder: Path, family: str | None, prediction: str | None) -> ModelPeek:
    from library.models.load import detect_family

    def read(name: str) -> dict:
        p = folder / name
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    unet = read("unet/config.json")
    family = family or detect_family(read("model_index.json"), unet)
    prediction = prediction or read("scheduler/scheduler_config.json").get("prediction_type") or "epsilon"
    levels = len(read("vae/config.json").get("block_out_channels", (0, 0, 0, 0)))
    return ModelPeek(family, folder, prediction, unet.get("sample_size"), 2 ** (levels - 1))


def _header_prediction(family: str, v_pred_key: bool, metadata: dict[str, str]) -> str | None:
    """As library.models.single_file.detect_prediction, from the header alone: None where it would read a weight."""
    if v_pred_key:
        return "v_prediction"
    spec = metadata.get("modelspec.prediction_type")
    if spec in ("v", "v_prediction"):
        return "v_prediction"
    if spec == "epsilon" or family != "sd2":
        return "epsilon"
    return None
