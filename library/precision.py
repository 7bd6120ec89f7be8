"""Precision names as configs spell them (save.save_precision, output.precision, train.mixed_precision) -> torch
dtypes: the one table every writer, the loop, the estimate and the merges use."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of a train.mixed_precision setting ("no" -> fp32): frozen weights are kept in it."""
    return DTYPES.get(mixed_precision, torch.float32)


def cast_floating_(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype=dtype)` one tensor at a time: each floating parameter / buffer is replaced by its cast and
    the original freed before the next is cast, so a cast holds one extra tensor, not a second copy of the module
    (`Module.to` builds every new tensor before it lets the old ones go)."""
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in sub.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != dtype:
                setattr(sub, name, b.to(dtype))
