"""The merge recipe (`merge_models.py`): `[merge]` what to merge and how, `[[lora]]` LoRAs to merge in, `[extract]`
LoRA extraction / resizing, `[output]` where and in which precision. No torch here: config modules stay light.

Block weights (`block_alphas`, `block_betas`, `[[lora]].block_weights`) take the forms users paste from the A1111
"Merge Block Weighted" extension and supermerger: 25 values (SDXL 19) for IN00..OUT11 (SDXL ..OUT08) with BASE from
the plain value, 26 (SDXL 20) with BASE first, the same as one comma-separated string, or a preset name
(library/merge/blocks.py PRESETS). SD3 / SD3.5 (ComfyUI's ModelMergeSD3 slots): N + 6 values for pos_embed,
x_embedder, context_embedder, y_embedder, t_embedder, joint_blocks.0..N-1 and final_layer (N = 24 for SD3 / SD3.5
Medium, 38 for SD3.5 Large), or N + 7 with BASE first. The count is checked once the model is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from library.config.fields import opt
from library.errors import ConfigError

MergeMode = Literal["weighted_sum", "add_difference", "triple_sum", "sum_twice", "ties", "dare", "dare_ties",
                    "lora_merge", "lora_extract", "lora_resize"]
OutputFormat = Literal["auto", "single_file", "diffusers"]
Precision = Literal["fp16", "bf16", "fp32"]

# Which of model_a / model_b / model_c each mode reads.
NEEDS: dict[str, tuple[str, ...]] = {
    "weighted_sum": ("model_a", "model_b"), "add_difference": ("model_a", "model_b", "model_c"),
    "triple_sum": ("model_a", "model_b", "model_c"), "sum_twice": ("model_a", "model_b", "model_c"),
    "ties": ("model_a",), "dare": ("model_a",), "dare_ties": ("model_a",),
    "lora_merge": ("model_a",), "lora_extract": ("model_a", "model_b"), "lora_resize": (),
}
TASK_MODES = ("ties", "dare", "dare_ties")


@dataclass
class MergeConfig:
    """`[merge]`: the inputs and the formula."""

    mode: MergeMode = opt(
        "weighted_sum",
        "weighted_sum (1-a)A+aB | add_difference A+a(B-C) | triple_sum (1-a-b)A+aB+bC | sum_twice "
        "(1-b)((1-a)A+aB)+bC | ties | dare | dare_ties (task vectors of `models` over base model_a) | lora_merge "
        "([[lora]] into model_a) | lora_extract (LoRA of model_b - model_a) | lora_resize (extract.lora to a new rank)",
    )
    model_a: str = opt("", "Model A (the base for add_difference, TIES/DARE, lora_merge, lora_extract): a "
                           ".safetensors / .ckpt file, a diffusers folder or a 'tiny:sd15:seed=1' reference.")
    model_b: str = opt("", "Model B (lora_extract: the fine-tuned model).")
    model_c: str = opt("", "Model C (add_difference, triple_sum, sum_twice).")
    alpha: float = opt(0.5, "a: the weight of B in the formulas above (BASE slot when block_alphas has no BASE).")
    beta: float = opt(0.0, "b: the weight of C in triple_sum / sum_twice.")
    block_alphas: str | list[float] = opt(
        "", "Per-block a: 25/26 values (SDXL 19/20; SD3 joint blocks + 6/7), a comma-separated string of them, or "
            "a preset (e.g. GRAD_V).")
    block_betas: str | list[float] = opt("", "Per-block b, in the same forms as block_alphas.")
    models: list[str] = opt([], "ties / dare / dare_ties: the fine-tuned models whose deltas from model_a merge.")
    weights: list[float] = opt([], "ties / dare: one weight per entry of `models` (default 1 each).")
    density: float = opt(0.2, "ties: fraction of each delta kept (top magnitudes); dare: keep probability 1 - p.")
    scale: float = opt(1.0, "ties / dare: lambda, the scale of the merged task vector added to model_a.")
    seed: int = opt(0, "dare: seed of the random drop masks (per tensor, so results do not depend on order).")

    def validate(self) -> None:
        for key in NEEDS[self.mode]:
            if not getattr(self, key).strip():
                raise ConfigError(f"merge.mode = '{self.mode}' needs merge.{key} (a file, folder or tiny: reference)")
        if self.mode in TASK_MODES:
            if not self.models:
                raise ConfigError(f"merge.mode = '{self.mode}' needs merge.models: the fine-tuned models to merge")
            if self.weights and len(self.weights) != len(self.models):
                raise ConfigError(f"merge.weights has {len(self.weights)} values for {len(self.models)} "
                                  "merge.models; give one per model or none")
            if not 0 < self.density <= 1:
                raise ConfigError(f"merge.density must be in (0, 1] (got {self.density})")


@dataclass
class LoraEntry:
    """`[[lora]]`: one LoRA merged into model_a (mode lora_merge): kohya format, or for SD3 either of its layouts."""

    path: str = opt("", "The LoRA .safetensors file (kohya format; SD3: the diffusers/peft or sd-scripts layout).")
    strength: float = opt(1.0, "Multiplier of this LoRA's delta (as <lora:name:strength> in A1111).")
    block_weights: str | list[float] = opt(
        "", "Per-block strength multipliers in the block_alphas forms (BASE = text encoders); '' = all 1.")

    def validate(self) -> None:
        if not self.path.strip():
            raise ConfigError("[[lora]] entry without a path: set path = \"my_lora.safetensors\"")


@dataclass
class ExtractConfig:
    """`[extract]`: LoRA extraction (model_b - model_a by SVD) and resizing."""

    rank: int = opt(32, "Rank of the Linear / 1x1-conv layers of the extracted or resized LoRA (an SD3 LoRA is "
                        "written in the diffusers/peft layout).")
    conv_rank: int = opt(0, "Rank of the 3x3-conv layers (LoCon); 0 = leave 3x3 convs out.")
    clamp_quantile: float = opt(0.99, "Clamp the factors' values at this quantile of their magnitudes (sd-scripts "
                                      "extract_lora_from_models clamp_quantile); 1 = no clamp.")
    min_diff: float = opt(1e-6, "Layers whose largest |B - A| is below this are identical: left out of the LoRA.")
    text_encoder: bool = opt(True, "Extract the text encoder(s) too.")
    lora: str = opt("", "lora_resize: the LoRA file to resize.")

    def validate(self) -> None:
        if self.rank < 1 or self.conv_rank < 0:
            raise ConfigError(f"extract.rank must be >= 1 and extract.conv_rank >= 0 (got {self.rank}, "
                              f"{self.conv_rank})")
        if not 0 < self.clamp_quantile <= 1:
            raise ConfigError(f"extract.clamp_quantile must be in (0, 1] (got {self.clamp_quantile})")


@dataclass
class OutputConfig:
    """`[output]`: what is written."""

    path: str = opt("output/merged.safetensors", "Output: a .safetensors file, or a folder for format = diffusers "
                                                 "(LoRA modes: a .safetensors LoRA).")
    format: OutputFormat = opt("auto", "auto (a .safetensors path -> single file, else a diffusers folder), "
                                       "single_file or diffusers.")
    precision: Precision = opt("fp16", "Precision of the floating-point tensors written: fp16, bf16 or fp32.")
    config_dir: str = opt("", "Diffusers config folder for a diffusers output when no input is a diffusers folder "
                              "('' = the bundled config of the family).")
    overwrite: bool = opt(False, "Replace an existing output.")

    def validate(self) -> None:
        if not self.path.strip():
            raise ConfigError("output.path is empty: name the merged file or folder")
        if self.format == "single_file" and not self.path.lower().endswith(".safetensors"):
            raise ConfigError(f"output.format = 'single_file' needs a .safetensors output.path (got '{self.path}')")


@dataclass
class MergeRecipe:
    merge: MergeConfig = opt(MergeConfig(), "What to merge and how.")
    lora: list[LoraEntry] = opt([], "LoRAs merged into model_a (mode lora_merge).")
    extract: ExtractConfig = opt(ExtractConfig(), "LoRA extraction and resizing.")
    output: OutputConfig = opt(OutputConfig(), "Where and how the result is written.")

    def validate(self) -> None:
        mode = self.merge.mode
        if mode == "lora_merge" and not self.lora:
            raise ConfigError("merge.mode = 'lora_merge' needs at least one [[lora]] table with a path")
        if mode == "lora_resize" and not self.extract.lora.strip():
            raise ConfigError("merge.mode = 'lora_resize' needs extract.lora: the LoRA file to resize")
        if mode in ("lora_extract", "lora_resize"):
            if not self.output.path.lower().endswith(".safetensors") or self.output.format == "diffusers":
                raise ConfigError(f"merge.mode = '{mode}' writes a LoRA: output.path must be a .safetensors file")
