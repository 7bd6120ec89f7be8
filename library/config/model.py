"""The `[model]` table: which base model to load and how to read it (family, prediction type, VAE, CLIP skip)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from library.config.fields import opt
from library.errors import ConfigError

FamilyChoice = Literal["auto", "sd1", "sd2", "sdxl"]
PredictionChoice = Literal["auto", "epsilon", "v_prediction"]


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str = opt(
        "tiny:sd15",
        "Base model: a diffusers folder, a .safetensors/.ckpt file, or an embedded test model "
        "'tiny:sd15' | 'tiny:sd2' | 'tiny:sdxl' (options: 'tiny:sd15:seed=2', 'tiny:sd2:prediction=epsilon').",
    )
    family: FamilyChoice = opt("auto", "Model family; 'auto' detects it from the folder or file.")
    prediction_type: PredictionChoice = opt(
        "auto", "What the UNet predicts; 'auto' reads the scheduler config (folders) or file (single files)."
    )
    v_parameterization: bool = opt(False, "sd-scripts' flag: same as prediction_type = 'v_prediction'.")
    vae: str = opt("", "Replacement VAE: a diffusers VAE folder or a single .safetensors file ('' = the model's own).")
    config_dir: str = opt(
        "", "Diffusers config folder for a single-file model ('' = the bundled config of the detected family)."
    )
    variant: str = opt("", "Weight variant of a diffusers folder, e.g. 'fp16' for *.fp16.safetensors ('' = default).")
    clip_skip: int = opt(1, "Text-encoder layer to condition on, counted from the end: 1 = last, 2 = penultimate.")

    def validate(self) -> None:
        if not self.pretrained_model_name_or_path.strip():
            raise ConfigError("model.pretrained_model_name_or_path is empty: name a folder, a file or 'tiny:sd15'")
        if self.v_parameterization and self.prediction_type == "epsilon":
            raise ConfigError(
                "model.v_parameterization = true conflicts with model.prediction_type = 'epsilon': "
                "remove one of them (v_parameterization means prediction_type = 'v_prediction')"
            )
        if self.clip_skip < 1:
            raise ConfigError(f"model.clip_skip must be 1 (last layer) or more (got {self.clip_skip})")

    def resolved_prediction_type(self) -> str | None:
        """The prediction type the config forces, or None to keep what the model says."""
        if self.v_parameterization:
            return "v_prediction"
        return None if self.prediction_type == "auto" else self.prediction_type

    def resolved_family(self) -> str | None:
        """The family the config forces, or None to detect it."""
        return None if self.family == "auto" else self.family
