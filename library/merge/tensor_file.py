"""The reading side of merges, below every model layout: a `.safetensors` file read tensor by tensor
(`SafetensorsFile`), and a model seen as single-file keys -> tensors read on demand (`Entry`, `TensorSource`).

library/merge/stream.py builds sources of SD1 / SD2 / SDXL single files and folders on these, and
library/merge/sd3_stream.py those of SD3 folders; library/merge/writers.py writes outputs.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from library.errors import ModelFileError
from library.models.safe_load import read_safetensors_header
from library.models.families import Family
from library.models.sd3.single_file import is_sd3_keys
from library.models.single_file import SD1_TE, SD2_TE, detect_family


DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# Pipeline depth of a merge (pipeline.run_pipeline's `in_flight`): keys between read and written at any moment.
IN_FLIGHT = 4
# A result larger than this gets its own memory instead of a reused output buffer (recipe.OutputRing), so that the
# ring is not left holding IN_FLIGHT copies of a model's few largest tensors (SDXL: 5 over 32 MiB, the largest 126 MB).
RING_MAX_BYTES = 32 << 20
# madvise(MADV_POPULATE_READ) (Linux 5.14+): map a range's pages now, reading them from disk if needed, without
# copying them (a plain read fault would come later, on the merging thread). Python 3.11's mmap module lacks the name.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def _madvise_without_gil() -> Callable[[int, int, int], int] | None:
    """libc's madvise(addr, length, advice) through ctypes, which releases the GIL during the call. mmap.madvise
    holds the GIL, and a populate that waits for the disk then stalls the merging and writing threads too (a cold
    2 GB merge: merge stage 10.0 s busy against 1.6 s warm). None where libc has no madvise."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _madvise_without_gil() if _MADV_POPULATE_READ is not None else None


class SafetensorsFile:
    """Header-checked safetensors file; `read(key)` returns one tensor backed by its own memory map of the file.

    Each tensor maps only its own byte range, copy-on-write (mmap ACCESS_COPY: the file is never written, and an
    in-place change to the tensor changes private pages only), and the map is released when the tensor is dropped.
    So a merge reads the page cache without copying it into new memory, and the resident memory counts only the
    tensors in use, not every page of the file touched so far (the trouble with one map of the whole file, where
    reading two 7 GB files shows as a 14 GB RSS). Pages are faulted in by `read` itself (MADV_POPULATE_READ), so the
    reader thread of a pipelined merge does the disk reads. As with any mmap (and safetensors' own loader), a file
    truncated by another program while a tensor is in use raises SIGBUS.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.shapes, self.metadata = read_safetensors_header(self.path)  # validates sizes and offsets
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._entries = {k: (DTYPES[v["dtype"]], tuple(v["data_offsets"])) for k, v in header.items()}
        self._fd: int | None = None
        self._populate = _MADV_POPULATE_READ if _madvise is not None else None

    def keys(self) -> list[str]:
        return list(self.shapes)

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def offset(self, key: str) -> int:
        """Where the key's bytes start in the file (reading keys in this order reads the file front to back)."""
        return self._data_start + self._entries[key][1][0]

    def read(self, key: str) -> torch.Tensor:
        dtype, (start, end) = self._entries[key]
        if end == start:
            return torch.empty(self.shapes[key], dtype=dtype)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        pos = self._data_start + start
        base = pos - pos % mmap.ALLOCATIONGRANULARITY  # map offsets must be aligned
        try:
            m = mmap.mmap(self._fd, pos - base + end - start, access=mmap.ACCESS_COPY, offset=base)
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{self.path}: cannot read tensor '{key}' ({e}; truncated or changed file?)") from e
        tensor = torch.frombuffer(memoryview(m)[pos - base:], dtype=dtype).reshape(self.shapes[key])
        if self._populate is not None and _madvise is not None:
            # The map starts page-aligned, pos - base bytes before the tensor's data.
            if _madvise(tensor.data_ptr() - (pos - base), len(m), self._populate) != 0:
                self._populate = None  # an older kernel (EINVAL): pages are read when first touched instead
        return tensor

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Entry:
    """How a source produces one single-file key: read it (`read`) or an alias of another key of the source."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    offset: int | None = None  # position in a single input file, for reading it front to back; None: not known


class TensorSource:
    """A model seen as single-file keys -> tensors read on demand."""

    def __init__(self, name: str, entries: dict[str, Entry], metadata: Mapping[str, str], closers: list[Any],
                 folder: Path | None = None):
        self.name, self.entries, self.metadata, self._closers = name, entries, dict(metadata), closers
        self.folder = folder  # the diffusers folder this source reads, if it is one (its configs are reusable)
        family = source_family(entries)
        if family is None:
            raise ModelFileError(f"{name}: not an SD1/SD2/SDXL/SD3 checkpoint (no text-encoder keys "
                                 f"{SD1_TE}*, {SD2_TE}* or conditioner.embedders.1.*, and no MMDiT keys "
                                 "model.diffusion_model.joint_blocks.*)")
        self.family: Family = family

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str) -> torch.Tensor:
        return self.entries[key].read()

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    @property
    def prediction_type(self) -> str:
        """As `load_single_file` decides it (v_pred key, modelspec metadata, SD2 norm-statistics probe); SD3 models
        predict rectified flow."""
        from library.models.single_file import detect_prediction

        if self.family == "sd3":
            return "flow"
        return detect_prediction(self, self.family, None)  # type: ignore[arg-type]

    def close(self) -> None:
        for c in self._closers:
            c.close()


def source_family(keys: Any) -> Family | None:
    """SD3 by its MMDiT joint blocks (an SD3 file may hold no text encoder), else the SD1 / SD2 / SDXL rule of
    `single_file.detect_family` (by the text-encoder sections)."""
    keys = list(keys)
    return "sd3" if is_sd3_keys(keys) else detect_family(keys)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from e


def _const(t: torch.Tensor) -> Entry:
    return Entry(tuple(t.shape), t.dtype, lambda: t)
