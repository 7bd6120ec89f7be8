"""Writing a single-file checkpoint, the same for every family (library/models/single_file.py for SD1 / SD2 / SDXL,
library/models/sd3/single_file.py for SD3): `.safetensors` only, floating tensors cast to the save dtype, the
header's metadata strings only, the file written atomically. Each family maps its keys first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from library.errors import ModelFileError
from library.fileio import atomic_path
from library.models.safe_load import SAFETENSORS_SUFFIX

SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_single_file_target(path: Path, dtype: torch.dtype, metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Refuse a pickle name, a dtype other than fp32 / fp16 / bf16, and metadata that is not str -> str, before any
    work is done; returns the metadata as a new dict."""
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ModelFileError(f"{path}: single files are written as {SAFETENSORS_SUFFIX} only (never pickles)")
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype must be float32, float16 or bfloat16, got {dtype}")
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad entry {bad[0]!r}")
    return meta


def write_single_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                      metadata: Mapping[str, str]) -> None:
    """Write the tensors (floating ones in `dtype`, on the CPU, contiguous) with `metadata`, atomically."""
    from safetensors.torch import save_file

    stored = {k: _stored(v, dtype) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(stored, str(tmp), metadata=dict(metadata))


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    if t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()
