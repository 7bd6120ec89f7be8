"""Build modules without initialising them, then give them the file's tensors: the fast, one-copy load path.

`empty(build)` runs a module constructor under accelerate's `init_empty_weights()`: every parameter is moved to
the meta device as it is registered (shapes and dtypes, no memory), so the random initialisation the constructor
runs next (kaiming for ~1 B SD1.5 parameters) touches nothing; buffers stay real, so the ones a module computes
and never saves (CLIP's `position_ids`) are right. `assign_weights` then hands the module the tensors read from the
file with `load_state_dict(strict=True, assign=True)` (PyTorch's meta-device recipe: the file's tensors become
the parameters; nothing is copied into a second, initialised set). So loading holds the model's bytes once, and
costs what reading the file costs.

diffusers' and transformers' `from_pretrained` do the same in principle, but around it resolve hub files,
variants, quantizers, device maps and attention back-ends for every call (0.05-0.3 s per component for the tiny
model on 2 CPU cores, with a progress bar per text encoder), which a local diffusers folder or single file does
not need. Folders this path does not handle (pickled `.bin` weights, the key set of an older diffusers) go through
`from_pretrained` (library/models/load.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, MutableMapping, TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


class WeightsMismatch(ValueError):
    """The file's tensors do not fit the module built from the config (missing, unexpected or reshaped keys)."""


def empty(build: Callable[[], M]) -> M:
    """`build()` with its parameters on the meta device (shapes only, no memory, no initialisation)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def assign_weights(module: torch.nn.Module, state: MutableMapping[str, torch.Tensor], *,
                   dtype: torch.dtype | None = None) -> None:
    """Make `state`'s tensors the module's parameters and persistent buffers (all keys, exact shapes), cast to
    `dtype` if given (floating tensors only, one at a time in place in `state`, so a cast never holds two copies of
    the model). WeightsMismatch names the first missing / unexpected / mis-shaped key, checked before anything
    is assigned."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise WeightsMismatch(f"{first} ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, want in own.items():
        if tuple(state[k].shape) != tuple(want.shape):
            raise WeightsMismatch(f"'{k}' has shape {list(state[k].shape)}, the config's model {list(want.shape)}")
    if dtype is not None:
        for k in list(state):
            if state[k].is_floating_point() and state[k].dtype != dtype:
                state[k] = state[k].to(dtype)
    module.load_state_dict(state, strict=True, assign=True)
    left = next((k for k, p in module.named_parameters() if p.device.type == "meta"), None)
    if left is not None:  # a parameter outside the state dict (none in these models): never train on an empty one
        raise WeightsMismatch(f"parameter '{left}' is not in the state dict and was left empty")


def folder_weights(component: Path, stem: str, variant: str | None) -> Path | None:
    """The safetensors weights of a diffusers component folder: `<stem>[.<variant>].safetensors`, or its
    shard index `<stem>[.<variant>].safetensors.index.json`; None when the folder holds another format."""
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    for candidate in (component / name, component / f"{name}.index.json"):
        if candidate.is_file():
            return candidate
    return None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or of all shards an `.index.json` names, read once into memory."""
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text(encoding="utf-8"))
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_safetensors(path.parent / shard))
        return state
    return _read_aligned(path)


# safetensors dtype names (the format's spec, huggingface/safetensors README) -> torch dtypes.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _read_aligned(path: Path) -> dict[str, torch.Tensor]:
    """Read each tensor straight into a tensor torch allocated (one copy, no intermediate buffer).

    Written by hand because `safetensors.torch.load_file` hands back tensors inside Python bytes objects, at
    addresses 40 or 56 bytes past a 64-byte boundary, and CPU kernels vectorise differently on such memory: the
    tiny SDXL UNet's output then differed from the in-memory model's in the 5th digit
    (tests/test_models_load.py::test_save_diffusers_round_trip_gives_identical_outputs). Torch's allocator aligns
    to 64 bytes, as the model's own parameters are. The header is checked first by library/models/safe_load.py.
    """
    from library.models.safe_load import read_safetensors_header

    read_safetensors_header(path)  # sizes, dtypes, offsets inside the file: ModelFileError naming the key if not
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # file order
            start, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            f.seek(8 + n + start)
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if end > start else memoryview(b"")
            got = f.readinto(view) if end > start else 0
            while got < end - start:  # readinto may return short counts on pipes and some file systems
                more = f.readinto(view[got:])
                if not more:
                    raise OSError(f"{path}: file ended inside tensor '{key}'")
                got += more
            out[key] = tensor
    return out
