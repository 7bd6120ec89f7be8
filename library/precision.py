"""Precision names as configs spell them (save.save_precision, output.precision, train.mixed_precision) -> torch
dtypes: the one table every writer, the loop, the estimate and the merges use."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of a train.mixed_precision setting ("no" -> fp32): frozen weights are kept in it."""
    return DTYPES.get(mixed_precision, torch.float32)
