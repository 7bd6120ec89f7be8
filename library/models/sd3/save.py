"""Write an SD3 `SDModel` as a diffusers folder (what `StableDiffusion3Pipeline.from_pretrained` loads).

Same rules as library/models/save.py for the UNet families: the folder appears complete or not at all, weights are
converted copy by copy (the model is not modified), CLIP encoders carry `text_model.` keys. A model without T5
writes `text_encoder_3` / `tokenizer_3` as null, as diffusers saves a pipeline loaded with `text_encoder_3=None`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from library.fileio import atomic_path
from library.models.model import SDModel

TE_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2", "tokenizer_3")
# T5EncoderModel ties `encoder.embed_tokens` to `shared` (transformers' _tied_weights_keys); the released files and
# diffusers folders store `shared.weight` only, and safetensors refuses two names for one storage.
T5_TIED = "encoder.embed_tokens.weight"


def model_index_sd3(model: SDModel) -> dict[str, Any]:
    import diffusers

    index: dict[str, Any] = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for i, (te_name, tok_name) in enumerate(zip(TE_NAMES, TOKENIZER_NAMES)):
        if i < len(model.text_encoders):
            index[te_name] = ["transformers", type(model.text_encoders[i]).__name__]
            index[tok_name] = ["transformers", "T5TokenizerFast" if i == 2 else "CLIPTokenizer"]
        else:
            index[te_name] = [None, None]
            index[tok_name] = [None, None]
    return dict(sorted(index.items()))


def write_configs_sd3(model: SDModel, folder: Path) -> None:
    """Every config of the folder (model index, transformer, VAE, text encoders, tokenizers, scheduler), no weights."""
    from library.models.save import _write_json, save_tokenizer

    folder = Path(folder)
    _write_json(folder / "model_index.json", model_index_sd3(model))
    model.unet.save_config(folder / "transformer")
    model.vae.save_config(folder / "vae")
    for name, te in zip(TE_NAMES, model.text_encoders):
        cfg = te.config.to_dict()
        cfg["architectures"] = [type(te).__name__]
        _write_json(folder / name / "config.json", cfg)
    for i, (name, tok) in enumerate(zip(TOKENIZER_NAMES, model.tokenizers)):
        if i < 2:
            save_tokenizer(tok, folder / name)
        else:
            tok.save_pretrained(folder / name)
            _drop_machine_specific(folder / name / "tokenizer_config.json")
    scheduler = dict(model.scheduler_config)
    scheduler.setdefault("_class_name", "FlowMatchEulerDiscreteScheduler")
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)


def save_diffusers_sd3(model: SDModel, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write `model` as a diffusers folder with floating weights in `dtype` (atomic)."""
    from safetensors.torch import save_file

    from library.models.save import _tensor, text_encoder_state_dict

    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        write_configs_sd3(model, tmp)
        for name, module in (("transformer", model.unet), ("vae", model.vae)):
            weights = {k: _tensor(v, dtype) for k, v in module.state_dict().items()}
            save_file(weights, tmp / name / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        for i, (name, te) in enumerate(zip(TE_NAMES, model.text_encoders)):
            if i < 2:
                weights = text_encoder_state_dict(te, dtype)
            else:
                weights = {k: _tensor(v, dtype) for k, v in te.state_dict().items() if k != T5_TIED}
            save_file(weights, tmp / name / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def _drop_machine_specific(path: Path) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
