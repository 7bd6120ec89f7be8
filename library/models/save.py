"""Write an `SDModel` as a standard diffusers folder (what `StableDiffusion(XL)Pipeline.from_pretrained` loads).

Single-file checkpoints are written by `library.models.single_file`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from library.fileio import atomic_path
from library.models.model import SDModel

# transformers 5 names CLIPTextModel weights without the `text_model.` prefix; transformers 4, released checkpoints
# and kohya LoRA keys use it, and transformers 4 silently re-initialises weights it cannot match. transformers 5
# loads both forms (tests/test_models_load.py checks it), so every text encoder we write carries the prefix.
TEXT_MODEL_PREFIX = "text_model."


def _component_names(model: SDModel) -> tuple[list[str], list[str]]:
    n = len(model.text_encoders)
    return ["text_encoder", "text_encoder_2"][:n], ["tokenizer", "tokenizer_2"][:n]


def model_index(model: SDModel) -> dict[str, Any]:
    """The pipeline's model_index.json. Components we never carry (safety checker, ...) are null, as diffusers
    writes them for pipelines saved without those parts."""
    te_names, tok_names = _component_names(model)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if model.family == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "DDPMScheduler")],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for name, te in zip(te_names, model.text_encoders):
        index[name] = ["transformers", type(te).__name__]
    for name in tok_names:
        index[name] = ["transformers", "CLIPTokenizer"]
    if model.family == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    else:
        index["safety_checker"] = [None, None]
        index["requires_safety_checker"] = False
    return dict(sorted(index.items()))


def write_configs(model: SDModel, folder: Path) -> None:
    """Every config of the folder (model index, UNet, VAE, text encoders, tokenizers, scheduler), no weights."""
    folder = Path(folder)
    te_names, tok_names = _component_names(model)
    _write_json(folder / "model_index.json", model_index(model))
    model.unet.save_config(folder / "unet")
    model.vae.save_config(folder / "vae")
    for name, te in zip(te_names, model.text_encoders):
        cfg = te.config.to_dict()
        cfg["architectures"] = [type(te).__name__]
        _write_json(folder / name / "config.json", cfg)
    for name, tok in zip(tok_names, model.tokenizers):
        save_tokenizer(tok, folder / name)
    scheduler = dict(model.scheduler_config)
    scheduler["prediction_type"] = model.prediction_type
    scheduler.setdefault("_class_name", "DDPMScheduler")
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """transformers 5 writes only `tokenizer.json`; the classic `vocab.json` + `merges.txt` (what transformers 4's
    CLIPTokenizer, A1111 and ComfyUI tooling read) are added from it, so the folder loads with either version."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    fast = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    bpe = fast["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for machine_specific in ("is_local", "local_files_only", "name_or_path"):
        config.pop(machine_specific, None)
    _write_json(config_path, config)
    special = {k: str(getattr(tokenizer, k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    _write_json(folder / "special_tokens_map.json", special)


def text_encoder_state_dict(text_encoder: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The text encoder's weights with `text_model.`-prefixed keys (the released / transformers 4 form)."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        # CLIPTextModelWithProjection keys already read `text_model.*` / `text_projection.*`.
        if not key.startswith((TEXT_MODEL_PREFIX, "text_projection.")):
            key = TEXT_MODEL_PREFIX + key
        out[key] = _tensor(value, dtype)
    return out


def save_diffusers(model: SDModel, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write `model` as a diffusers folder with weights in `dtype`; the folder appears complete or not at all.

    The model itself is not modified (weights are converted copy by copy).
    """
    if model.family == "sd3":  # transformer/ and three text encoders (library/models/sd3/save.py)
        from library.models.sd3.save import save_diffusers_sd3

        return save_diffusers_sd3(model, out_dir, dtype=dtype)
    out_dir = Path(out_dir)
    te_names, _ = _component_names(model)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        write_configs(model, tmp)
        for name, module in (("unet", model.unet), ("vae", model.vae)):
            weights = {k: _tensor(v, dtype) for k, v in module.state_dict().items()}
            save_file(weights, tmp / name / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        for name, te in zip(te_names, model.text_encoders):
            save_file(text_encoder_state_dict(te, dtype), tmp / name / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def _tensor(value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # Integer buffers (e.g. CLIP's position_ids, when present) keep their type. No copy when nothing changes:
    # safetensors only reads the tensors (these modules have no tied weights that would share storage).
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    return value.detach().contiguous()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
