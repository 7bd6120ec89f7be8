"""`[optimizer]` and `[scheduler]`: which optimizer steps the weights and how its learning rate moves.

Built by library/training/optim.py (`build_optimizer`, `build_scheduler`). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from library.config.fields import opt
from library.errors import ConfigError

# Spelled as sd-scripts' --optimizer_type; anything else must be a dotted path "module.Class".
OPTIMIZER_TYPES: tuple[str, ...] = (
    "AdamW", "AdamW8bit", "Lion8bit", "PagedAdamW8bit", "Adafactor", "CAME", "Prodigy", "Lion", "SGD",
)
SchedulerType = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "cosine_with_min_lr", "polynomial"
]
SCHEDULER_TYPES: tuple[str, ...] = get_args(SchedulerType)


@dataclass
class OptimizerConfig:
    """`[optimizer]`: the optimizer and its learning rates."""

    optimizer_type: str = opt(
        "AdamW",
        "AdamW, AdamW8bit, Lion8bit, PagedAdamW8bit, Adafactor, CAME, Prodigy, Lion, SGD, or a dotted path module.Class",
    )
    learning_rate: float = opt(1e-4, "base learning rate (Prodigy: ~1.0, it finds the step size itself)")
    unet_lr: float | None = opt(None, "learning rate of the UNet parameters; unset = learning_rate")
    text_encoder_lr: float | None = opt(None, "learning rate of the text encoder parameters; unset = learning_rate")
    weight_decay: float = opt(0.01, "decoupled weight decay (AdamW-style); SGD: L2 penalty")
    betas: list[float] = opt([0.9, 0.999], "momentum coefficients (CAME takes three; two given = CAME's defaults)")
    eps: float = opt(1e-8, "denominator epsilon of Adam-type optimizers")
    optimizer_args: dict[str, Any] = opt({}, "extra keyword arguments for the optimizer, e.g. {momentum = 0.9}")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this before each step; 0 = no clipping")

    def lr_for(self, name: str) -> float:
        """Learning rate of a parameter group: "unet" -> unet_lr, "text_encoder*" -> text_encoder_lr, each falling
        back to learning_rate; any other name gets learning_rate."""
        if name == "unet" and self.unet_lr is not None:
            return self.unet_lr
        if name.startswith("text_encoder") and self.text_encoder_lr is not None:
            return self.text_encoder_lr
        return self.learning_rate

    def validate(self) -> None:
        if self.optimizer_type not in OPTIMIZER_TYPES and "." not in self.optimizer_type:
            raise ConfigError(
                f"optimizer.optimizer_type = {self.optimizer_type!r} is unknown: use one of "
                f"{', '.join(OPTIMIZER_TYPES)}, or a dotted path such as 'torch.optim.RAdam'"
            )
        for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"optimizer.{key} = {value} must be >= 0")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay = {self.weight_decay} must be >= 0")
        if len(self.betas) not in (2, 3) or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas = {self.betas} must be 2 (or, for CAME, 3) numbers in [0, 1)")
        if self.max_grad_norm < 0:
            raise ConfigError(f"optimizer.max_grad_norm = {self.max_grad_norm} must be >= 0 (0 = no clipping)")


@dataclass
class SchedulerConfig:
    """`[scheduler]`: the learning-rate schedule, as a factor on each group's learning rate per optimizer step."""

    scheduler_type: SchedulerType = opt("constant", "constant, constant_with_warmup, linear, cosine, "
                                        "cosine_with_restarts, cosine_with_min_lr or polynomial")
    warmup_steps: int = opt(0, "linear warmup from 0 over this many optimizer steps")
    warmup_ratio: float = opt(0.0, "warmup as a fraction of the total steps (instead of warmup_steps)")
    num_cycles: int = opt(1, "cosine_with_restarts: number of hard restarts")
    min_lr_ratio: float = opt(0.0, "cosine_with_min_lr / polynomial: final learning rate as a fraction of the base")
    power: float = opt(1.0, "polynomial: decay power (1 = linear)")

    def validate(self) -> None:
        if self.scheduler_type not in SCHEDULER_TYPES:
            raise ConfigError(
                f"scheduler.scheduler_type = {self.scheduler_type!r} is unknown: use one of {', '.join(SCHEDULER_TYPES)}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps = {self.warmup_steps} must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"scheduler.warmup_ratio = {self.warmup_ratio} must be in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("set scheduler.warmup_steps or scheduler.warmup_ratio, not both")
        if self.scheduler_type == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise ConfigError(
                "scheduler.scheduler_type = 'constant' has no warmup: use 'constant_with_warmup' "
                "or remove scheduler.warmup_steps / scheduler.warmup_ratio"
            )
        if self.num_cycles < 1:
            raise ConfigError(f"scheduler.num_cycles = {self.num_cycles} must be >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"scheduler.min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")
        if self.min_lr_ratio and self.scheduler_type not in ("cosine_with_min_lr", "polynomial"):
            raise ConfigError(
                f"scheduler.min_lr_ratio is used by 'cosine_with_min_lr' and 'polynomial', not "
                f"{self.scheduler_type!r}: change scheduler.scheduler_type or remove scheduler.min_lr_ratio"
            )
        if self.power <= 0:
            raise ConfigError(f"scheduler.power = {self.power} must be > 0")
