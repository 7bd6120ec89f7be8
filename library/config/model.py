"""The `[model]` table: which base model to load and how to read it (family, prediction type, VAE, CLIP skip)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from library.config.fields import opt
from library.errors import ConfigError

FamilyChoice = Literal["auto", "sd1", "sd2", "sdxl", "sd3"]
# "flow" (rectified flow) is what SD3 models predict; it is read from the model, and naming it is allowed for clarity.
PredictionChoice = Literal["auto", "epsilon", "v_prediction", "flow"]


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str = opt(
        "tiny:sd15",
        "Base model: a diffusers folder, a .safetensors/.ckpt file, or an embedded test model "
        "'tiny:sd15' | 'tiny:sd2' | 'tiny:sdxl' | 'tiny:sd3' (options: 'tiny:sd15:seed=2', "
        "'tiny:sd2:prediction=epsilon').",
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
    clip_l: str = opt("", "SD3: CLIP-L text encoder file (e.g. clip_l.safetensors) when the checkpoint holds none.")
    clip_g: str = opt("", "SD3: CLIP-G text encoder file (e.g. clip_g.safetensors) when the checkpoint holds none.")
    t5xxl: str = opt("", "SD3: T5-XXL text encoder file (e.g. t5xxl_fp16.safetensors) when the checkpoint holds none.")
    t5_tokenizer: str = opt(
        "", "SD3: folder of the T5 tokenizer (tokenizer.json or spiece.model), for single files ('' = the model's "
        "tokenizer_3/ folder; none is bundled)."
    )
    use_t5: bool = opt(
        True, "SD3: use T5-XXL; false drops it (its tokens are zeros, as SD3 allows) and saves ~9 GB at fp16."
    )
    t5xxl_max_token_length: int = opt(256, "SD3: T5 tokens per caption (sd-scripts and diffusers default 256).")

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
        if self.t5xxl_max_token_length < 1:
            raise ConfigError(f"model.t5xxl_max_token_length must be 1 or more (got {self.t5xxl_max_token_length})")
        if self.prediction_type == "flow" and self.v_parameterization:
            raise ConfigError("model.v_parameterization = true conflicts with model.prediction_type = 'flow'")

    def resolved_prediction_type(self) -> str | None:
        """The prediction type the config forces, or None to keep what the model says."""
        if self.v_parameterization:
            return "v_prediction"
        return None if self.prediction_type == "auto" else self.prediction_type

    def resolved_family(self) -> str | None:
        """The family the config forces, or None to detect it."""
        return None if self.family == "auto" else self.family
