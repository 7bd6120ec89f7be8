"""`SDModel`: the in-memory bundle every script works on. Module and key names are diffusers' throughout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.models.families import Family, PredictionType


@dataclass
class SDModel:
    family: Family
    prediction_type: PredictionType
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoders: list[Any]  # [CLIPTextModel] (SD1/SD2) or [CLIPTextModel, CLIPTextModelWithProjection] (SDXL)
    tokenizers: list[Any]  # transformers.CLIPTokenizer, one per text encoder
    scheduler_config: dict[str, Any]  # diffusers DDPMScheduler config (betas, prediction type, ...)
    source: str  # what the user named: a path or a "tiny:..." reference
    config_dir: Path  # a diffusers-format folder with this model's configs (bundled or the source folder)
    extra: dict[str, Any] = field(default_factory=dict)  # facts read from the file (e.g. zero-terminal-SNR marker)
