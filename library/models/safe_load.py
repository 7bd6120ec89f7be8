"""Reading tensor files users hand us, without ever running code from them.

- `.safetensors`: the JSON header is read and checked first (size, dtypes, shapes, offsets inside the file), then
  tensors are read one at a time on demand through `safetensors.safe_open` (no whole-file load).
- `.ckpt` / `.pt` / `.pth` / `.bin` (pickles): ONLY `torch.load(..., weights_only=True, map_location="cpu")`, whose
  restricted unpickler accepts tensors and plain containers and refuses every other global, so a payload (a
  `__reduce__` that calls `os.system`, ...) is rejected before it can run. A Lightning checkpoint's
  `{"state_dict": ...}` wrapper is unwrapped.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from library.errors import ModelFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# safetensors itself refuses headers over 100 MB (safetensors `MAX_HEADER_SIZE`); a larger length is corruption.
MAX_HEADER_BYTES = 100_000_000
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class TensorFile(Mapping[str, Any]):
    """Read-only mapping key -> torch.Tensor over a checked file; safetensors tensors are read when indexed."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str],
                 tensors: dict[str, Any] | None = None):
        self.path = path
        self.shapes = shapes  # every key's shape, known before any tensor is read
        self.metadata = metadata  # safetensors `__metadata__` ({} for pickles)
        self._tensors = tensors  # pickles: already in memory
        self._handle: Any = None

    def __getitem__(self, key: str) -> Any:
        if key not in self.shapes:
            raise KeyError(key)
        if self._tensors is not None:
            return self._tensors[key]
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:  # header passed our check, so this is an I/O or library-level failure
                raise ModelFileError(f"{self.path}: cannot open as safetensors ({e})") from e
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class TensorView(Mapping[str, Any]):
    """A tensor file's tensors under the names the key maps read (normalised keys, non-weight extras left out);
    tensors are still read on demand. `f` is a TensorFile, or any mapping with `.shapes` of the same keys."""

    def __init__(self, f: Mapping[str, Any], names: dict[str, str]):
        self.f, self.names = f, names  # name read -> key in the file

    def __getitem__(self, key: str) -> Any:
        return self.f[self.names[key]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.f.shapes[self.names[key]])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def open_tensor_file(path: str | os.PathLike) -> TensorFile:
    """Open a `.safetensors` file (header checked, tensors lazy) or a pickle (through `load_pickle_weights`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        shapes, metadata = read_safetensors_header(path)
        return TensorFile(path, shapes, metadata)
    if suffix in PICKLE_SUFFIXES:
        tensors = load_pickle_weights(path)
        return TensorFile(path, {k: tuple(v.shape) for k, v in tensors.items()}, {}, tensors)
    raise ModelFileError(f"{path}: unknown model file type '{suffix}' "
                         f"(use {SAFETENSORS_SUFFIX} or one of {', '.join(PICKLE_SUFFIXES)})")


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Check a safetensors header against the format (8-byte little-endian length, JSON, per-tensor dtype, shape,
    data_offsets inside the data area, matching byte counts). Returns (shapes, metadata)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ModelFileError(f"{path}: malformed safetensors header (declared length {n} bytes, file {size})")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: malformed safetensors header (not JSON: {e})") from e
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(f"{path}: malformed safetensors header (__metadata__ must map strings to strings)")
    data_bytes = size - 8 - n
    shapes: dict[str, tuple[int, ...]] = {}
    for key, entry in header.items():
        shapes[key] = _check_entry(path, key, entry, data_bytes)
    return shapes, metadata


def _check_entry(path: Path, key: str, entry: Any, data_bytes: int) -> tuple[int, ...]:
    bad = f"{path}: malformed safetensors header at key '{key}'"
    if not isinstance(entry, dict):
        raise ModelFileError(f"{bad} (entry is not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise ModelFileError(f"{bad} (unknown dtype {dtype!r})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ModelFileError(f"{bad} (shape {shape!r} is not a list of sizes)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise ModelFileError(f"{bad} (data_offsets {offsets!r} outside the {data_bytes}-byte data area)")
    count = 1
    for d in shape:
        count *= d
    if offsets[1] - offsets[0] != count * _DTYPE_BYTES[dtype]:
        raise ModelFileError(f"{bad} ({offsets[1] - offsets[0]} bytes stored for a {dtype} tensor of shape {shape})")
    return tuple(shape)


def read_pickle_dict(path: Path, what: str = "PyTorch checkpoint") -> dict[Any, Any]:
    """A pickled dict through torch's weights-only unpickler (tensors and plain values only); anything else is
    refused with a ModelFileError naming the file. Shared by checkpoints, embeddings and hypernetworks."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global outside torch's allow-list *before* calling it, so nothing ran.
        text = str(e)
        if "Unsupported global" not in text:
            with open(path, "rb") as fh:
                is_pickle = fh.read(2)[:1] == b"\x80" or zipfile.is_zipfile(path)  # PROTO opcode / torch zip
            if not is_pickle:  # a bad first opcode: not a pickle at all
                raise ModelFileError(f"{path}: not a readable {what} (not a pickle or zip checkpoint)") from e
            raise ModelFileError(f"{path}: refused to load: not a plain {what} (the pickle holds more than "
                                 "tensors and plain values; nothing from it was run)") from e
        named = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        raise ModelFileError(
            f"{path}: refused to load: the pickle asks to call code, not just store tensors "
            f"({named.split(' was ')[0].removeprefix('WeightsUnpickler error: ')}); nothing from it was run. "
            "Only load files you trust: get a .safetensors release, or convert a trusted one with another tool"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not a readable {what} ({e})") from e
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: holds a {type(obj).__name__}, not a {what} dict")
    return obj


def load_pickle_weights(path: Path) -> dict[str, Any]:
    """Tensors of a pickled checkpoint through torch's weights-only unpickler; anything else is refused."""
    import torch

    obj = read_pickle_dict(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / LDM checkpoints wrap the weights
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelFileError(f"{path}: holds no tensors")
    return tensors
