"""The `[train]`, `[save]`, `[sample]` and `[log]` tables: how the shared training loop runs, saves, samples, logs.

`[train.deepspeed]` (DeepSpeedConfig) turns on DeepSpeed ZeRO through accelerate; library/training/deepspeed.py builds
the DeepSpeed config from it and from the other tables (accumulation, clipping, precision), so users never write a
DeepSpeed JSON file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from library.config.fields import opt
from library.errors import ConfigError

MixedPrecision = Literal["no", "fp16", "bf16"]
Offload = Literal["none", "cpu"]
# Keys of the generated DeepSpeed config that our own tables own; `extra` may not override them.
DEEPSPEED_OWNED_KEYS = ("optimizer", "scheduler", "gradient_accumulation_steps", "gradient_clipping", "fp16", "bf16",
                        "train_batch_size", "train_micro_batch_size_per_gpu")


@dataclass
class DeepSpeedConfig:
    """`[train.deepspeed]`: DeepSpeed ZeRO (optional package: pip install deepspeed), passed to accelerate."""

    zero_stage: int = opt(0, "DeepSpeed ZeRO stage: 0 = DeepSpeed off, 1/2 = partition optimizer states/gradients, "
                             "3 = also parameters.")
    offload_optimizer: Offload = opt("none", "'cpu' keeps optimizer states in CPU memory and steps them with "
                                             "DeepSpeed's CPU Adam (AdamW only).")
    offload_param: Offload = opt("none", "'cpu' keeps parameters in CPU memory between uses (zero_stage = 3 only).")
    extra: dict[str, Any] = opt({}, "More DeepSpeed config keys merged into the generated config, "
                                    "e.g. {zero_optimization = {overlap_comm = true}}.")

    @property
    def enabled(self) -> bool:
        return self.zero_stage > 0

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.deepspeed.zero_stage = {self.zero_stage} must be 0 (off), 1, 2 or 3")
        if not self.enabled and (self.offload_optimizer != "none" or self.offload_param != "none" or self.extra):
            raise ConfigError("train.deepspeed.offload_optimizer / offload_param / extra need DeepSpeed on: "
                              "set train.deepspeed.zero_stage = 2 (or 1, 3)")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ConfigError("train.deepspeed.offload_param = 'cpu' needs train.deepspeed.zero_stage = 3")
        for key in DEEPSPEED_OWNED_KEYS:
            if key in self.extra:
                raise ConfigError(
                    f"train.deepspeed.extra.{key} is set from our own tables (optimizer, scheduler, "
                    "train.gradient_accumulation_steps, optimizer.max_grad_norm, train.mixed_precision, data.batch_size); "
                    f"remove it from train.deepspeed.extra")


@dataclass
class TrainConfig:
    seed: int = opt(42, "Seed for data order, noise, caption transforms and initialisation.")
    max_train_steps: int = opt(1600, "Optimizer steps to train (ignored when max_train_epochs is set).")
    max_train_epochs: int = opt(0, "Train this many epochs instead of max_train_steps (0 = use max_train_steps).")
    gradient_accumulation_steps: int = opt(1, "Batches whose gradients are summed before one optimizer step.")
    mixed_precision: MixedPrecision = opt("no", "Autocast precision; fp16 uses a grad scaler on CUDA; CPU: bf16 only.")
    full_bf16: bool = opt(False, "Keep the trained weights themselves in bf16 (saves memory; use with AdamW8bit).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward: far less memory, ~30% slower.")
    attention: Literal["sdpa", "xformers"] = opt("sdpa", "Attention kernel: PyTorch SDPA, or xformers (CUDA only).")
    torch_compile: bool = opt(False, "Compile the UNet with torch.compile (slow first step, faster after).")
    cpu_threads: int = opt(0, "Intra-op CPU threads (torch.set_num_threads; 0 = PyTorch's default). 1 is faster "
                              "for the tiny demo models, whose many small ops pay more for threads than they gain.")
    ema: bool = opt(False, "Keep an exponential moving average of the trained weights and save it.")
    ema_decay: float = opt(0.9999, "EMA decay per optimizer step.")
    ema_on_cpu: bool = opt(False, "Keep the EMA copy in CPU memory (saves GPU memory; slower).")
    max_consecutive_nan_steps: int = opt(5, "Stop (saving the last good state) after this many non-finite losses in a row.")
    train_text_encoder: bool = opt(False, "Also train the text encoder(s) (full fine-tune / DreamBooth).")
    stop_text_encoder_training: int = opt(0, "Stop training the text encoder(s) after this step (0 = never stop).")
    resume: str = opt("", "Resume from a saved state folder, or 'auto' for the newest one under save.output_dir.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where to train: auto picks CUDA when available.")
    deepspeed: DeepSpeedConfig = opt(DeepSpeedConfig(), "DeepSpeed ZeRO (multi-GPU memory saving, CPU offload).")
    validate_every_n_steps: int = opt(0, "Validation loss (data.validation_split images) every N optimizer steps; with this and validate_every_n_epochs 0, at the end of every epoch (sd-scripts).")
    validate_every_n_epochs: int = opt(0, "Validation loss at the end of every N-th epoch (0 = see validate_every_n_steps).")
    max_validation_steps: int = opt(0, "Validation batches per evaluation: the first N, the same each time (0 = all).")

    def validate(self) -> None:
        if self.max_train_steps < 1 and self.max_train_epochs < 1:
            raise ConfigError("train.max_train_steps or train.max_train_epochs must be at least 1")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("train.gradient_accumulation_steps must be at least 1")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be between 0 and 1 (got {self.ema_decay})")
        if self.max_consecutive_nan_steps < 1:
            raise ConfigError("train.max_consecutive_nan_steps must be at least 1")
        if min(self.validate_every_n_steps, self.validate_every_n_epochs, self.max_validation_steps) < 0:
            raise ConfigError("train.validate_every_n_steps, validate_every_n_epochs and max_validation_steps must "
                              "not be negative")
        if self.cpu_threads < 0:
            raise ConfigError(f"train.cpu_threads must be 0 (PyTorch's default) or more (got {self.cpu_threads})")
        if self.deepspeed.enabled:
            if self.train_text_encoder:
                raise ConfigError("train.train_text_encoder = true with train.deepspeed: DeepSpeed wraps one model "
                                  "(the UNet); set train.train_text_encoder = false or train.deepspeed.zero_stage = 0")
            if self.resume:
                raise ConfigError("train.resume with train.deepspeed: resuming DeepSpeed runs is not supported (its "
                                  "optimizer state is partitioned inside the engine); remove train.resume")
            if self.ema and self.deepspeed.zero_stage == 3:
                raise ConfigError("train.ema = true with train.deepspeed.zero_stage = 3: ZeRO-3 partitions the "
                                  "weights the EMA follows; use zero_stage = 2 or train.ema = false")


@dataclass
class SaveConfig:
    output_dir: str = opt("output", "Folder for results, resolved config, samples, logs and resume states.")
    output_name: str = opt("last", "Base name of the saved files.")
    save_every_n_steps: int = opt(0, "Save a result (and resume state) every N optimizer steps (0 = off).")
    save_every_n_epochs: int = opt(0, "Save a result (and resume state) every N epochs (0 = off).")
    save_last_n: int = opt(2, "Keep only the newest N intermediate results and states (0 = keep all).")
    save_state: bool = opt(True, "Write a resume state (optimizer, RNG, data position) with each save.")
    format: Literal["safetensors", "diffusers"] = opt("safetensors", "Checkpoint format: single file or diffusers folder.")
    save_precision: Literal["fp32", "fp16", "bf16"] = opt("fp16", "Precision of the saved weights.")

    def validate(self) -> None:
        if not self.output_name or "/" in self.output_name:
            raise ConfigError(f"save.output_name must be a plain file name (got {self.output_name!r})")
        if min(self.save_every_n_steps, self.save_every_n_epochs, self.save_last_n) < 0:
            raise ConfigError("save.save_every_n_steps, save_every_n_epochs and save_last_n must not be negative")


@dataclass
class SampleConfig:
    prompts: list[str] = opt([], "Sample prompts in sd-scripts syntax: 'a cat --n blurry --w 512 --h 512 --d 1 --s 20 --l 7'.")
    prompts_file: str = opt("", "A text file with one sample prompt per line (same syntax; # starts a comment).")
    sample_every_n_steps: int = opt(0, "Generate the sample prompts every N steps (0 = off).")
    sample_every_n_epochs: int = opt(0, "Generate the sample prompts every N epochs (0 = off).")
    sample_at_end: bool = opt(True, "Generate the sample prompts when training finishes (if any are given).")
    sampler: Literal["euler_a", "euler", "ddim", "dpmsolver++", "pndm"] = opt("euler_a", "Sampling scheduler.")
    steps: int = opt(20, "Default inference steps (--s).")
    cfg_scale: float = opt(7.0, "Default classifier-free guidance scale (--l).")
    width: int = opt(0, "Default width (--w); 0 = the training resolution.")
    height: int = opt(0, "Default height (--h); 0 = the training resolution.")
    seed: int = opt(-1, "Default seed (--d); -1 = derive from train.seed and the prompt index.")

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("sample.steps must be at least 1")


@dataclass
class LogConfig:
    log_with: Literal["tensorboard", "none"] = opt("tensorboard", "Where to log loss, lr and timings.")
    logging_dir: str = opt("", "TensorBoard folder (default: <output_dir>/logs).")
    log_every_n_steps: int = opt(1, "Write scalars every N steps.")
    progress_bar: bool = opt(True, "Show a tqdm progress bar with loss, lr and it/s.")
