"""Writing a diffusers folder, the same for every family: what differs (the model index, the denoiser's sub-folder,
the text-encoder and tokenizer sub-folders, the scheduler config) is a `FolderLayout`, made by library/models/save.py
for SD1 / SD2 / SDXL and by library/models/sd3/save.py for SD3.

The folder appears complete or not at all; weights are converted copy by copy (the model is not modified); CLIP
text encoders carry `text_model.` keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.fileio import atomic_path
from library.models.model import SDModel

# transformers 5 names CLIPTextModel weights without the `text_model.` prefix; transformers 4, released checkpoints
# and kohya LoRA keys use it, and transformers 4 silently re-initialises weights it cannot match. transformers 5
# loads both forms (tests/test_models_load.py checks it), so every text encoder we write carries the prefix.
TEXT_MODEL_PREFIX = "text_model."
# T5EncoderModel ties `encoder.embed_tokens` to `shared` (transformers' _tied_weights_keys); the released files and
# diffusers folders store `shared.weight` only, and safetensors refuses two names for one storage.
T5_TIED = "encoder.embed_tokens.weight"
# Keys transformers writes into tokenizer_config.json that describe the machine that saved it, not the tokenizer.
_MACHINE_SPECIFIC = ("is_local", "local_files_only", "name_or_path")


@dataclass(frozen=True)
class FolderLayout:
    """What a family's folder holds besides the weights."""

    index: dict[str, Any]  # model_index.json
    denoiser: str  # the sub-folder of `model.unet`: "unet", or "transformer" (SD3)
    text_encoders: tuple[str, ...]  # a sub-folder per text encoder of the model, in order
    tokenizers: tuple[str, ...]  # a sub-folder per tokenizer
    scheduler: dict[str, Any]  # scheduler/scheduler_config.json


def write_configs(model: SDModel, folder: Path, layout: FolderLayout) -> None:
    """Every config of the folder (model index, denoiser, VAE, text encoders, tokenizers, scheduler), no weights."""
    folder = Path(folder)
    write_json(folder / "model_index.json", layout.index)
    model.unet.save_config(folder / layout.denoiser)
    model.vae.save_config(folder / "vae")
    for name, te in zip(layout.text_encoders, model.text_encoders):
        cfg = te.config.to_dict()
        cfg["architectures"] = [type(te).__name__]
        write_json(folder / name / "config.json", cfg)
    for name, tok in zip(layout.tokenizers, model.tokenizers):
        save_tokenizer(tok, folder / name)
    write_json(folder / "scheduler" / "scheduler_config.json", layout.scheduler)


def save_folder(model: SDModel, out_dir: str | os.PathLike, layout: FolderLayout, dtype: torch.dtype) -> Path:
    """Write `model` as a diffusers folder with floating weights in `dtype` (atomic)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        write_configs(model, tmp, layout)
        for name, module in ((layout.denoiser, model.unet), ("vae", model.vae)):
            weights = {k: tensor(v, dtype) for k, v in module.state_dict().items()}
            save_file(weights, tmp / name / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        for name, te in zip(layout.text_encoders, model.text_encoders):
            save_file(text_encoder_state_dict(te, dtype), tmp / name / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """transformers' `save_pretrained` without the machine-specific config keys. transformers 5 writes only
    `tokenizer.json`; for a BPE tokenizer (CLIP) the classic `vocab.json` + `merges.txt` and the special tokens map
    (what transformers 4's CLIPTokenizer, A1111 and ComfyUI tooling read) are added from it, so the folder loads with
    either version. T5's Unigram tokenizer has no such files."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in _MACHINE_SPECIFIC:
        config.pop(key, None)
    write_json(config_path, config)
    fast = folder / "tokenizer.json"  # absent for a slow (Python) tokenizer, which writes its own files
    bpe = json.loads(fast.read_text(encoding="utf-8"))["model"] if fast.is_file() else {}
    if bpe.get("type") != "BPE":
        return
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    special = {k: str(getattr(tokenizer, k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    write_json(folder / "special_tokens_map.json", special)


def text_encoder_state_dict(text_encoder: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights a text-encoder sub-folder stores: CLIP's with `text_model.`-prefixed keys (the released /
    transformers 4 form), T5's without its tied copy of `shared.weight`."""
    if text_encoder.config.model_type == "t5":
        return {k: tensor(v, dtype) for k, v in text_encoder.state_dict().items() if k != T5_TIED}
    out = {}
    for key, value in text_encoder.state_dict().items():
        # CLIPTextModelWithProjection keys already read `text_model.*` / `text_projection.*`.
        if not key.startswith((TEXT_MODEL_PREFIX, "text_projection.")):
            key = TEXT_MODEL_PREFIX + key
        out[key] = tensor(value, dtype)
    return out


def tensor(value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A weight as written: floating ones in `dtype` (None = as they are), integer buffers (e.g. CLIP's
    position_ids, when present) keep their type. No copy when nothing changes: safetensors only reads the tensors
    (these modules have no tied weights that would share storage)."""
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    return value.detach().contiguous()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
