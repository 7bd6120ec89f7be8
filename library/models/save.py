"""Write an SD1 / SD2 / SDXL `SDModel` as a standard diffusers folder (what `StableDiffusion(XL)Pipeline.from_pretrained`
loads); an SD3 model is handed to library/models/sd3/save.py. The writing itself, shared by every family, is
library/models/diffusers_folder.py.

Single-file checkpoints are written by `library.models.single_file`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from library.models import diffusers_folder as folder_io
from library.models.model import SDModel
from library.models.sd3.save import folder_layout_sd3


def model_index(model: SDModel) -> dict[str, Any]:
    """The pipeline's model_index.json. Components we never carry (safety checker, ...) are null, as diffusers
    writes them for pipelines saved without those parts."""
    te_names, tok_names = _component_names(model)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if model.family == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": folder_io.diffusers_version(),
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


def folder_layout(model: SDModel) -> folder_io.FolderLayout:
    """What the family's diffusers folder holds besides the weights (SD3: library/models/sd3/save.py)."""
    if model.family == "sd3":  # transformer/ and three text encoders
        return folder_layout_sd3(model)
    te_names, tok_names = _component_names(model)
    scheduler = dict(model.scheduler_config)
    scheduler["prediction_type"] = model.prediction_type
    scheduler.setdefault("_class_name", "DDPMScheduler")
    return folder_io.FolderLayout(index=model_index(model), denoiser="unet", text_encoders=te_names,
                                  tokenizers=tok_names, scheduler=scheduler)


def write_configs(model: SDModel, folder: Path) -> None:
    """Every config of the folder (model index, UNet or transformer, VAE, text encoders, tokenizers, scheduler), no
    weights."""
    folder_io.write_configs(model, folder, folder_layout(model))


def save_diffusers(model: SDModel, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write `model` as a diffusers folder with weights in `dtype`; the folder appears complete or not at all.

    The model itself is not modified (weights are converted copy by copy).
    """
    return folder_io.save_folder(model, out_dir, folder_layout(model), dtype)


def _component_names(model: SDModel) -> tuple[tuple[str, ...], tuple[str, ...]]:
    n = len(model.text_encoders)
    return ("text_encoder", "text_encoder_2")[:n], ("tokenizer", "tokenizer_2")[:n]
