"""Device, precision, attention and accelerate set-up for the training loop."""

from __future__ import annotations

import sys
from typing import Any

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
    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        print("note: train.mixed_precision = 'fp16' is not supported on CPU; training in fp32 "
              "(use 'bf16' for CPU autocast)", file=sys.stderr)
        return "no"
    if device.type == "cuda" and cfg.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision = 'bf16' but this GPU has no bf16 support; use 'fp16'")
    return cfg.mixed_precision


def make_accelerator(cfg: TrainConfig, device: torch.device, precision: str, deepspeed_plugin: Any = None):
    from accelerate import Accelerator

    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        deepspeed_plugin=deepspeed_plugin,
    )


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
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
