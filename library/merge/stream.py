"""Tensor-by-tensor model I/O for merges: inputs are read one tensor at a time, outputs written one tensor at a time.

Every input is seen in the single-file (LDM/SGM) key space, where block slots are defined:
- `SafetensorsFile`: a `.safetensors` file, each tensor read through its own small memory map (released with the
  tensor), not one map of the whole file, whose touched pages would all count towards the resident memory.
- `SingleFileSource`: a single-file checkpoint (`.safetensors`, or a `.ckpt` through the weights-only unpickler, which
  has to hold the whole file in memory: pickles cannot be read piecewise).
- `FolderSource`: a diffusers folder seen through the strict key maps (`library.models.keymaps*`), key by key, with
  the same extra keys `save_single_file` writes, so a folder and the single file of the same model are equal views.
Outputs are written by `library.merge.writers`.
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
from library.models import keymaps_clip as kc
from library.models.keymaps import KeyMap, KeyRule, to_ldm, unet_keymap, vae_keymap
from library.models.safe_load import open_tensor_file, read_safetensors_header
from library.models.single_file import (
    SD1_TE,
    SD2_TE,
    SDXL_TE1,
    SDXL_TE2,
    V_PRED_KEY,
    ZTSNR_KEY,
    detect_family,
)

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
        self.family = detect_family(entries)
        if self.family is None:
            raise ModelFileError(f"{name}: not an SD1/SD2/SDXL checkpoint (no text-encoder keys "
                                 f"{SD1_TE}*, {SD2_TE}* or conditioner.embedders.1.*)")

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
        """As `load_single_file` decides it (v_pred key, modelspec metadata, SD2 norm-statistics probe)."""
        from library.models.single_file import detect_prediction

        return detect_prediction(self, self.family, None)  # type: ignore[arg-type]

    def close(self) -> None:
        for c in self._closers:
            c.close()


def open_source(ref: str) -> TensorSource:
    """A single-file checkpoint, a diffusers folder or a `tiny:` reference, as a `TensorSource`."""
    if ref.startswith("tiny:"):
        from library.models.tiny import resolve_model_ref

        return folder_source(resolve_model_ref(ref), name=ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return folder_source(path)
    if path.is_file():
        return single_file_source(path)
    raise ModelFileError(f"{ref}: no such file or folder (give a .safetensors / .ckpt file, a diffusers folder or "
                         "a 'tiny:sd15:seed=1' reference)")


def single_file_source(path: Path) -> TensorSource:
    """Keys as in the file, except: `model_ema.*` (the trainer's EMA copy) is left out, and SD1 text-encoder keys
    saved without `text_model.` (old transformers) are read under their `text_model.` name, as `load_single_file`
    does. A pickle is read through torch's weights-only unpickler (`safe_load`)."""
    entries: dict[str, Entry] = {}
    closers: list[Any] = []
    if path.suffix.lower() == ".safetensors":
        f = SafetensorsFile(path)
        closers.append(f)
        shapes, metadata = f.shapes, f.metadata

        def reader(k: str) -> Callable[[], torch.Tensor]:
            return lambda: f.read(k)

        dtype, offset = f.dtype, f.offset
    else:
        tf = open_tensor_file(path)  # ModelFileError for unknown suffixes and unsafe pickles
        shapes, metadata = tf.shapes, tf.metadata

        def reader(k: str) -> Callable[[], torch.Tensor]:
            return lambda: tf[k]

        def dtype(k: str) -> torch.dtype:
            return tf[k].dtype

        def offset(k: str) -> int | None:
            return None

    for key, shape in shapes.items():
        if key.startswith("model_ema."):
            continue
        name = key
        if key.startswith(SD1_TE) and not key.startswith(SD1_TE + kc.TEXT_MODEL):
            name = SD1_TE + kc.TEXT_MODEL + key[len(SD1_TE):]
        entries[name] = Entry(tuple(shape), dtype(key), reader(key), offset(key))
    return TensorSource(str(path), entries, metadata, closers)


# ---------------------------------------------------------------------------------------------------------------
# Diffusers folders.

TE_PARTS = {"sd1": [("text_encoder", SD1_TE, "clip")], "sd2": [("text_encoder", SD2_TE, "openclip")],
             "sdxl": [("text_encoder", SDXL_TE1, "clip"), ("text_encoder_2", SDXL_TE2, "openclip")]}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


@dataclass
class Part:
    """One component of a diffusers folder: its weight file, its key map and its config."""

    name: str
    file: SafetensorsFile | None  # None when the key map was built from a config only (no weights)
    keymap: KeyMap
    config: dict[str, Any]
    file_keys: dict[str, str]  # key-map (diffusers, `text_model.` form) key -> key in the file


def folder_parts(folder: Path, family: str | None = None, *, with_weights: bool = True) -> tuple[str, list[Part]]:
    """(family, parts) of a diffusers folder. Without weights, the key lists come from models built on the meta
    device from the folder's configs (a configs-only folder, e.g. a bundled one, is enough)."""
    from library.models.load import detect_family as folder_family

    index_path = folder / "model_index.json"
    index = read_json(index_path) if index_path.is_file() else {}
    if not (folder / "unet" / "config.json").is_file():
        raise ModelFileError(f"{folder}: not a diffusers folder (no unet/config.json)")
    unet_cfg = read_json(folder / "unet" / "config.json")
    family = family or folder_family(index, unet_cfg)
    parts: list[Part] = []
    for name, kind, prefix in [("unet", "unet", ""), ("vae", "vae", ""),
                               *((n, k, p) for n, p, k in TE_PARTS[family])]:
        cfg_path = folder / name / "config.json"
        if not cfg_path.is_file():
            raise ModelFileError(f"{folder}: missing {name}/config.json (needed for an {family} model)")
        cfg = read_json(cfg_path)
        file = None
        if with_weights:
            wpath = folder / name / WEIGHT_FILES[name]
            if not wpath.is_file():
                raise ModelFileError(f"{folder}: missing {name}/{WEIGHT_FILES[name]} (merges read .safetensors "
                                     "diffusers folders; re-save a .bin folder with save_pretrained)")
            file = SafetensorsFile(wpath)
            raw = file.keys()
        else:
            raw = _meta_keys(kind, cfg)
        if kind in ("clip", "openclip"):
            keys = {_text_model_form(k): k for k in raw if not k.endswith("position_ids")}
            km = (kc.clip_keymap if kind == "clip" else kc.openclip_keymap)(prefix, list(keys))
        else:
            keys = {k: k for k in raw}
            km = (unet_keymap if kind == "unet" else vae_keymap)(cfg, list(keys))
        parts.append(Part(name, file, km, cfg, keys))
    return family, parts


def _text_model_form(key: str) -> str:
    """transformers 5 writes CLIPTextModel keys without `text_model.`; the key maps use the released form."""
    return key if key.startswith((kc.TEXT_MODEL, "text_projection.")) else kc.TEXT_MODEL + key


def _meta_keys(kind: str, cfg: dict[str, Any]) -> list[str]:
    from library.models.keymaps import meta_state_dict_keys

    if kind in ("unet", "vae"):
        return meta_state_dict_keys(kind, cfg)  # type: ignore[arg-type]
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if cfg.get("architectures", [""])[0] == "CLIPTextModelWithProjection" \
        else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    return list(kc.te_state_dict(model))


def folder_source(folder: Path, name: str | None = None) -> TensorSource:
    """A diffusers folder as single-file keys: the key maps' keys, plus what `model_to_ldm` adds (CLIP
    position_ids, OpenCLIP logit_scale, SD2's padding layer and identity text_projection, v_pred / ztsnr markers)."""
    family, parts = folder_parts(folder)
    entries: dict[str, Entry] = {}
    for part in parts:
        f = part.file
        assert f is not None
        for rule in part.keymap.rules:
            key = part.keymap.prefix + rule.ldm
            shapes = [f.shapes[part.file_keys[k]] for k in rule.diffusers]
            meta = to_ldm({k: torch.empty(s, device="meta") for k, s in zip(rule.diffusers, shapes)},
                          KeyMap(part.keymap.prefix, (rule,)))[key]
            entries[key] = Entry(tuple(meta.shape), f.dtype(part.file_keys[rule.diffusers[0]]),
                                 _rule_reader(f, part, rule))
        prefix = part.keymap.prefix
        if prefix in (SD1_TE, SDXL_TE1):
            for k, t in kc.clip_extras_to_write(prefix, part.config["max_position_embeddings"]).items():
                entries[k] = _const(t)
        elif prefix in (SD2_TE, SDXL_TE2):
            ldm_meta = {k: torch.empty(e.shape, device="meta") for k, e in entries.items() if k.startswith(prefix)}
            n = kc.file_layers(ldm_meta, prefix)
            extras = kc.openclip_extras_to_write(prefix, ldm_meta, part.config["hidden_size"],
                                                 pad_layer=prefix == SD2_TE)
            last, pad = f"{prefix}transformer.resblocks.{n - 1}.", f"{prefix}transformer.resblocks.{n}."
            for k, t in extras.items():
                if k.startswith(pad):  # SD2's padding layer repeats the last layer: read that layer again
                    src = entries[last + k[len(pad):]]
                    entries[k] = Entry(src.shape, src.dtype, src.read)
                else:
                    entries[k] = _const(t.to(entries[prefix + "ln_final.weight"].dtype))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = read_json(sched_path) if sched_path.is_file() else {}
    v_pred = sched.get("prediction_type") == "v_prediction"
    metadata = {"modelspec.prediction_type": "v" if v_pred else "epsilon"}  # the folder says; no probe needed
    if v_pred:
        entries[V_PRED_KEY] = _const(torch.zeros(0))
    if sched.get("rescale_betas_zero_snr"):
        entries[ZTSNR_KEY] = _const(torch.zeros(0))
    closers = [p.file for p in parts]
    source = TensorSource(name or str(folder), entries, metadata, closers, folder=folder)
    if source.family != family:
        raise ModelFileError(f"{folder}: its configs say {family} but its keys say {source.family}")
    return source


def _rule_reader(f: SafetensorsFile, part: Part, rule: KeyRule) -> Callable[[], torch.Tensor]:
    km = KeyMap(part.keymap.prefix, (rule,))
    key = part.keymap.prefix + rule.ldm

    def read() -> torch.Tensor:
        return to_ldm({k: f.read(part.file_keys[k]) for k in rule.diffusers}, km)[key]

    return read


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from e


def _const(t: torch.Tensor) -> Entry:
    return Entry(tuple(t.shape), t.dtype, lambda: t)
