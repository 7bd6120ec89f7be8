"""Device, precision, attention and accelerate set-up for the training loop."""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch

from library.config.train import TrainConfig
from library.errors import ConfigError


def pick_device(cfg: TrainConfig) -> torch.device:
    match cfg.device:
        case "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("train.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
            return torch.device("cuda")
        case "cpu":
            return torch.device("cpu")
        case _:
            raise ConfigError(f"train.device: unknown device {cfg.device!r}")


def effective_precision(cfg: TrainConfig, device: torch.device) -> str:
    """The mixed precision that will really run, saying so when it differs from the request.

    accelerate's Accelerator(cpu=True, mixed_precision="fp16") silently trains in fp32; we say it out loud instead.
    """
    if _runs_fp32(cfg, device):
        print("note: train.mixed_precision = 'fp16' is not supported on CPU; training in fp32 "
              "(use 'bf16' for CPU autocast)", file=sys.stderr)
        return "no"
    if device.type == "cuda" and cfg.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision = 'bf16' but this GPU has no bf16 support; use 'fp16'")
    return cfg.mixed_precision


def _runs_fp32(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cpu" and cfg.mixed_precision == "fp16"


def load_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The dtype the base model is loaded in: None (weights as stored) when the frozen weights will be half
    precision, so an fp16 file never gets a full-precision copy (the loop's placement then casts each frozen weight
    to the autocast dtype and each trained one to fp32, one tensor at a time); fp32 otherwise."""
    if cfg.mixed_precision in ("fp16", "bf16") and not _runs_fp32(cfg, pick_device(cfg)):
        return None
    return torch.float32


def make_accelerator(cfg: TrainConfig, device: torch.device, precision: str, deepspeed_plugin: Any = None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(
        # accelerate ignores a DeepSpeed plugin when cpu=True (accelerate/state.py); without CUDA it still runs on
        # the CPU, with DeepSpeed's CPU accelerator.
        cpu=device.type == "cpu" and deepspeed_plugin is None,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        deepspeed_plugin=deepspeed_plugin,
    )
    if deepspeed_plugin is not None and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(
            f"train.deepspeed is set but accelerate started {accelerator.distributed_type.value} instead of DeepSpeed: "
            "launch with plain `python <script>` or `accelerate launch` without --cpu (the TOML configures DeepSpeed)")
    return accelerator


class ManualSteps:
    """Optimizer steps run by the loop itself (no DeepSpeed): the default path.

    Each micro-batch's loss is divided by the accumulation count (by accelerate) and back-propagated, so the gradients sum to the
    mean over the step's batches; under DDP only the last micro-batch all-reduces (no_sync before it). A step with a
    non-finite loss is dropped (gradients zeroed) before it touches the weights. With DeepSpeed the engine does all
    of this itself: see library/training/deepspeed.py `EngineSteps`, the same interface, chosen in loop.train.
    """

    resumable = True

    def __init__(self, accelerator, optimizer, module, params: list, accumulation: int, max_grad_norm: float):
        self.accelerator, self.optimizer, self.module = accelerator, optimizer, module
        self.params, self.accumulation, self.max_grad_norm = params, accumulation, max_grad_norm

    @contextmanager
    def micro(self, index: int) -> Iterator[None]:
        sync = index == self.accumulation - 1 or self.accelerator.num_processes == 1
        with nullcontext() if sync else self.accelerator.no_sync(self.module):  # all-reduce once per optimizer step
            yield

    def backward(self, loss: torch.Tensor, finite: bool) -> None:
        if finite:
            # accelerate's backward divides by its gradient_accumulation_steps (= self.accumulation, make_accelerator)
            self.accelerator.backward(loss)

    def step(self, all_finite: bool) -> bool:
        """Clip and step when every loss was finite; returns whether the weights were updated.

        With clipping on, the total gradient norm comes for free: a non-finite one (finite loss, overflowing
        gradients) drops the step too, instead of writing NaN into the weights.
        """
        if all_finite and self.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
            all_finite = norm is None or bool(torch.isfinite(torch.as_tensor(norm)))
        if all_finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return all_finite

    def full_weights(self):
        return nullcontext()


def configure_unet(unet: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """Attention kernel, gradient checkpointing, compilation."""
    match cfg.attention:
        case "sdpa":
            pass  # diffusers' default AttnProcessor2_0 uses torch SDPA
        case "xformers":
            if device.type != "cuda":
                raise ConfigError("train.attention = 'xformers' needs a CUDA GPU; use 'sdpa' (the default)")
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ConfigError("train.attention = 'xformers' but xformers is not installed: "
                                  "pip install xformers (or use 'sdpa')") from None
            unet.enable_xformers_memory_efficient_attention()
        case _:
            raise ConfigError(f"train.attention: unknown kernel {cfg.attention!r}")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.torch_compile:
        unet.compile()  # in place: parameter names (and so saved keys) stay unchanged


def weight_dtype(precision: str) -> torch.dtype:
    """dtype for frozen weights: half precision when autocasting, else fp32."""
    from library.precision import autocast_dtype

    return autocast_dtype(precision)
