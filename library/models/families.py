"""Facts about the model families the toolkit trains. In memory everything uses diffusers names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["sd1", "sd2", "sdxl"]
PredictionType = Literal["epsilon", "v_prediction"]


@dataclass(frozen=True)
class FamilyFacts:
    name: Family
    resolution: int  # native training side in pixels
    context_dims: tuple[int, ...]  # hidden size of each text encoder, in order
    bucket_step: int  # default bucket side step (sd-scripts: 64)
    ss_base_model_version: str  # kohya `ss_base_model_version` for epsilon models
    label: str


FAMILIES: dict[str, FamilyFacts] = {
    "sd1": FamilyFacts("sd1", 512, (768,), 64, "sd_v1", "Stable Diffusion 1.x"),
    "sd2": FamilyFacts("sd2", 768, (1024,), 64, "sd_v2", "Stable Diffusion 2.x"),
    "sdxl": FamilyFacts("sdxl", 1024, (768, 1280), 64, "sdxl_base_v1-0", "Stable Diffusion XL"),
}
