"""Optimizers and learning-rate schedules from `[optimizer]` / `[scheduler]`.

    groups = [{"params": unet_params, "lr": cfg.optimizer.lr_for("unet"), "name": "unet"},
              {"params": te_params, "lr": cfg.optimizer.lr_for("text_encoder"), "name": "text_encoder"}]
    optimizer = build_optimizer(groups, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)   # scheduler.step() after each optimizer step

Optional packages (bitsandbytes, transformers, came-pytorch, prodigyopt) are imported only when chosen; a missing one
is a ConfigError that names the pip command. 8-bit CAME: no maintained PyPI package offers one (pytorch-optimizer 4.1
has CAME in 32-bit only and wraps bitsandbytes' 8-bit optimizers, which include no CAME), so there is none here; a
third-party class can still be named by dotted path.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from library.config.optim import OptimizerConfig, SchedulerConfig
from library.errors import ConfigError
from library.lean import unblock

# optimizer_type -> (module, class, pip package)
_OPTIONAL: dict[str, tuple[str, str, str]] = {
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "PagedAdamW8bit": ("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    # torch has no Lion; bitsandbytes' 32-bit Lion (Chen et al. 2023, arXiv 2302.06675) runs on CPU and GPU.
    "Lion": ("bitsandbytes.optim", "Lion", "bitsandbytes"),
    # transformers' Adafactor, as sd-scripts uses: it keeps relative_step / scale_parameter / warmup_init, which
    # torch.optim.Adafactor (no relative step, different defaults) does not have.
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers"),
    "CAME": ("came_pytorch", "CAME", "came-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
}


def _import_class(optimizer_type: str) -> type:
    if optimizer_type in _OPTIONAL:
        module_name, class_name, package = _OPTIONAL[optimizer_type]
        unblock(module_name.partition(".")[0])  # blocked at start-up until used (library/lean.py)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(
                f"optimizer.optimizer_type = {optimizer_type!r} needs the {package} package: pip install {package}"
            ) from e
        return getattr(module, class_name)
    module_name, _, class_name = optimizer_type.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"optimizer.optimizer_type = {optimizer_type!r}: cannot import module {module_name!r} ({e}); "
            "install its package or fix the dotted path"
        ) from e
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(
            f"optimizer.optimizer_type = {optimizer_type!r}: {module_name!r} has no optimizer class {class_name!r}"
        )
    return cls


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters (floating point, on a device with the kernel)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper; fall back to the devices fused AdamW has always had
        devices = {"cuda"}
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def _default_kwargs(cfg: OptimizerConfig, params: list[torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments for the chosen optimizer from the config's common fields; optimizer_args override them."""
    lr, wd, eps, betas2 = cfg.learning_rate, cfg.weight_decay, cfg.eps, tuple(cfg.betas[:2])
    args = cfg.optimizer_args
    match cfg.optimizer_type:
        case "AdamW":
            kwargs: dict[str, Any] = dict(lr=lr, betas=betas2, eps=eps, weight_decay=wd)
            if "fused" not in args and "foreach" not in args:
                if _fused_supported(params):
                    kwargs["fused"] = True
                else:
                    kwargs["foreach"] = True
            return kwargs
        case "AdamW8bit" | "PagedAdamW8bit":
            return dict(lr=lr, betas=betas2, eps=eps, weight_decay=wd)
        case "Lion8bit" | "Lion":
            return dict(lr=lr, betas=betas2, weight_decay=wd)
        case "Adafactor":
            # sd-scripts' recipe: a fixed learning rate driven by our scheduler. With optimizer_args
            # relative_step = true, Adafactor computes its own step size (lr must then be None) and the
            # schedule has no effect.
            kwargs = dict(lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=wd)
            if args.get("relative_step"):
                kwargs["lr"] = None
            return kwargs
        case "CAME":
            # CAME (Luo et al. 2023, arXiv 2307.02047) takes three betas and a pair of eps; two betas configured
            # means the paper's (0.9, 0.999, 0.9999), and eps keeps CAME's own default unless optimizer_args set it.
            betas3 = tuple(cfg.betas) if len(cfg.betas) == 3 else (0.9, 0.999, 0.9999)
            return dict(lr=lr, betas=betas3, weight_decay=wd)
        case "Prodigy":
            return dict(lr=lr, betas=betas2, eps=eps, weight_decay=wd)
        case "SGD":
            return dict(lr=lr, weight_decay=wd)
        case path if "." in path:
            # Unknown signature: only the learning rate is passed; everything else comes from optimizer_args.
            return dict(lr=lr)
        case other:
            raise ConfigError(f"optimizer.optimizer_type = {other!r} is unknown")


def build_optimizer(param_groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer of `cfg` over `param_groups` ({"params": [...], "lr": ..., "name": ...}; a group without "lr"
    gets cfg.learning_rate). Extra keys such as "name" stay in the groups (logging reads them)."""
    groups = []
    for group in param_groups:
        group = dict(group)
        group["params"] = list(group["params"])
        group.setdefault("lr", cfg.learning_rate)
        groups.append(group)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("build_optimizer got no parameters to train")
    if cfg.optimizer_type == "SGD":
        cls = torch.optim.SGD
    elif cfg.optimizer_type == "AdamW":
        cls = torch.optim.AdamW
    else:
        cls = _import_class(cfg.optimizer_type)
    kwargs = {**_default_kwargs(cfg, params), **cfg.optimizer_args}
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"optimizer.optimizer_type = {cfg.optimizer_type!r} rejected its arguments {sorted(kwargs)}: {e}; "
            "check optimizer.optimizer_args"
        ) from e


@dataclass
class LRFactor:
    """Learning-rate factor at an optimizer step, for torch's LambdaLR. A plain object (not a closure) so LambdaLR's
    state_dict stores its fields and a resumed run gets exactly the same schedule.

    Formulas as transformers' / diffusers' `get_scheduler` (warmup factor step / warmup, so step 0 has lr 0), with the
    decay progress p = (step - warmup) / (total - warmup) clamped to [0, 1]:
      linear: 1 - p;  cosine: (1 + cos(pi p)) / 2;  cosine_with_restarts: (1 + cos(pi ((cycles p) mod 1))) / 2, 0 at
      the end;  cosine_with_min_lr: m + (1 - m) (1 + cos(pi p)) / 2 (transformers' min_lr_rate);
      polynomial: m + (1 - m) (1 - p)**power (transformers' lr_end, here as a ratio m of the base lr).
    """

    kind: str
    warmup: int
    total: int
    num_cycles: int = 1
    min_lr_ratio: float = 0.0
    power: float = 1.0

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if step < self.warmup:
            return step / self.warmup
        p = min(1.0, max(0.0, (step - self.warmup) / max(1, self.total - self.warmup)))
        m = self.min_lr_ratio
        match self.kind:
            case "constant_with_warmup":
                return 1.0
            case "linear":
                return 1.0 - p
            case "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * p))
            case "cosine_with_restarts":
                if p >= 1.0:
                    return 0.0
                return 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * p) % 1.0)))
            case "cosine_with_min_lr":
                return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
            case "polynomial":
                return m + (1.0 - m) * (1.0 - p) ** self.power
            case other:
                raise ValueError(f"unknown scheduler type {other!r}")


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    """Warmup in optimizer steps: warmup_steps, or round(warmup_ratio * total_steps)."""
    return cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR multiplying every group's own lr by `LRFactor(step)`; call .step() once per optimizer step."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup = warmup_steps(cfg, total_steps)
    if cfg.scheduler_type not in ("constant", "constant_with_warmup") and warmup >= total_steps:
        raise ConfigError(
            f"the scheduler warmup ({warmup} steps) must be shorter than the run ({total_steps} optimizer steps): "
            "lower scheduler.warmup_steps / scheduler.warmup_ratio or train longer"
        )
    factor = LRFactor(
        kind=cfg.scheduler_type, warmup=warmup, total=total_steps, num_cycles=cfg.num_cycles,
        min_lr_ratio=cfg.min_lr_ratio, power=cfg.power,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
