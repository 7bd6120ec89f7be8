"""Tensor-by-tensor model I/O for merges: inputs are read one tensor at a time, outputs written one tensor at a time.

Every input is seen in the single-file (LDM/SGM) key space, where block slots are defined:
- `SafetensorsFile`: a `.safetensors` file, each tensor read through its own small memory map (released with the
  tensor), not one map of the whole file, whose touched pages would all count towards the resident memory.
- `SingleFileSource`: a single-file checkpoint (`.safetensors`, or a `.ckpt` through the weights-only unpickler, which
  has to hold the whole file in memory: pickles cannot be read piecewise).
- `FolderSource`: a diffusers folder seen through the strict key maps (`library.models.keymaps*`), key by key, with
  the same extra keys `save_single_file` writes, so a folder and the single file of the same model are equal views.
Outputs: `SafetensorsWriter` writes the header first (every key's dtype, shape and offsets are known before merging)
and then each tensor at its offset, with `os.pwrite` (one call per tensor, no user-space buffering), asking the kernel
to write back as it goes. `DirectSafetensorsWriter` writes the same bytes with O_DIRECT (bypassing the page cache,
about twice as fast on the benchmark's disk) from page-aligned staging chunks that the merge computes into, when the
keys come in declared order and the file system accepts it (`open_writer` picks). safetensors' Python API only writes
whole dicts, and no maintained package streams safetensors writes, so the format is written here: 8-byte
little-endian header length, the JSON header (padded with spaces to a multiple of 8 bytes, as safetensors does; the
format allows trailing whitespace in the header), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import queue
import struct
import sys
import threading
import time
from collections import deque
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


# ---------------------------------------------------------------------------------------------------------------
# Output.


# While writing, every WRITEBACK_BYTES the writer asks the kernel to start writing the finished part to disk and to
# drop it from the page cache (posix_fadvise DONTNEED does both on Linux: dirty pages are queued for writeback, clean
# ones dropped). The disk then works while the merge goes on, the fsync at the end finds little left to do, and a
# 7 GB output does not push the inputs (or other programs' files) out of the page cache.
WRITEBACK_BYTES = 64 << 20


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, in any order: the header (from the declared dtypes and shapes)
    goes first, each `write` lands at its key's offset (declare the keys in the order they will be written for one
    front-to-back pass), and `close` checks that every key was written once and fsyncs the file."""

    def __init__(self, path: str | Path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.specs = dict(specs)
        prefix, self.offsets, total = _layout(self.specs, metadata)
        self._data_start = len(prefix)
        self._written: set[str] = set()
        self._span = (1 << 62, 0)  # byte range written since the last writeback request
        self._last_span = self._span
        self.fsync_s = 0.0  # time the final fsync took (reported by merge timings)
        self.direct = False  # page-cache writes (DirectSafetensorsWriter: True while it bypasses the cache)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0),
                                       0o666)
        self._pwrite(prefix, 0)
        os.ftruncate(self._fd, self._data_start + total)

    def buffer(self, key: str) -> torch.Tensor | None:
        """Where the caller may build the key's tensor to save a copy: none here (see DirectSafetensorsWriter)."""
        return None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.specs[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{key}: declared {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        if key in self._written:
            raise ValueError(f"{key} written twice")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # little-endian on every supported host
        start = self._data_start + self.offsets[key]
        self._pwrite(memoryview(data.numpy()), start)
        self._written.add(key)
        self._span = (min(self._span[0], start), max(self._span[1], start + data.numel()))
        if self._span[1] - self._span[0] >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            # This span starts writing back; the previous one, written back by now (or soon), leaves the cache.
            lo = min(self._span[0], self._last_span[0])
            hi = max(self._span[1], self._last_span[1])
            assert self._fd is not None
            os.posix_fadvise(self._fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            self._last_span, self._span = self._span, (1 << 62, 0)

    def _pwrite(self, data: Any, offset: int) -> None:
        assert self._fd is not None, "write after close"
        view = memoryview(data).cast("B")
        while view:  # pwrite may write less than asked (signals, some file systems)
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self, fsync: bool = True) -> None:
        """Check every key was written, fsync (unless told not to) and close."""
        missing = [k for k in self.specs if k not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: {len(missing)} declared tensors never written, e.g. {missing[0]}")
        if self._fd is None:
            return
        try:
            if fsync:
                t0 = time.perf_counter()
                os.fsync(self._fd)
                self.fsync_s = time.perf_counter() - t0
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without checks (the merge failed; atomic_path removes the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_writer(path: str | Path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                metadata: Mapping[str, str] | None = None, *, direct: bool = True
                ) -> SafetensorsWriter | DirectSafetensorsWriter:
    """A writer for `specs` written in their declared order: `DirectSafetensorsWriter` where the file system accepts
    O_DIRECT (and `direct`), else `SafetensorsWriter`. Both write the same bytes."""
    if direct:
        try:
            return DirectSafetensorsWriter(path, specs, metadata)
        except DirectIOUnsupported:
            pass
    return SafetensorsWriter(path, specs, metadata)


# O_DIRECT output: the written bytes go from the writer's memory to the disk, bypassing the page cache. Buffered
# writes of a 7 GB file ran at 270-440 MB/s on the benchmark's disk (dirty-page writeback throttling; every byte also
# copied into the cache) against 680-720 MB/s with O_DIRECT (`dd bs=16M oflag=direct`), and they push the inputs out
# of the cache. O_DIRECT needs each write's file offset, length and memory address aligned to the device's logical
# block size (open(2), "O_DIRECT"); DIRECT_ALIGN, the page size, is a multiple of the usual 512 and 4096.
DIRECT_ALIGN = 4096
DIRECT_CHUNK_BYTES = 16 << 20  # staging chunk: the size of one direct write (a larger tensor gets a larger chunk)
DIRECT_QUEUE = 2  # chunks queued for the I/O thread besides the one it is writing
DIRECT_FREE_BYTES = 160 << 20  # staging memory kept for reuse once written
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none (tests set it to 0 to run without it)


class DirectIOUnsupported(OSError):
    """The file system refuses O_DIRECT (tmpfs before Linux 6.6, some network and FUSE file systems) or the
    platform has none."""


class _Chunk:
    """A page-aligned staging buffer for the file bytes [start, end); `start` is DIRECT_ALIGN-aligned. `last`: index of
    the last key with bytes in it; `next`: the chunk after it, which starts at end rounded down and whose first
    bytes are this chunk's unaligned tail (copied there when this chunk is sent)."""

    __slots__ = ("buf", "end", "last", "next", "start")

    def __init__(self, start: int, end: int, buf: torch.Tensor):
        self.start, self.end, self.buf, self.last = start, end, buf, -1
        self.next: _Chunk | None = None


class DirectSafetensorsWriter:
    """Write a safetensors file with O_DIRECT, tensor by tensor in the declared order, byte for byte what
    `SafetensorsWriter` writes (the same header, then each tensor's bytes).

    The file is assembled front to back in page-aligned staging chunks (header first: it is known from the specs).
    A chunk that is complete is handed to an I/O thread, which writes its aligned part with one `pwrite` on the
    O_DIRECT descriptor while the merge goes on; the unaligned last bytes move to the start of the next chunk, which
    begins at that aligned offset. The file's final unaligned tail is written through a second, ordinary descriptor.
    `buffer(key)` gives the key's place in its chunk, so a merge can compute straight into it: nothing is copied
    between the merge and the disk. If a direct write is refused (EINVAL: a file system that opens with O_DIRECT but
    cannot do it, or stricter alignment), that write and all later ones go through the ordinary descriptor; `direct`
    tells which happened. `close` fsyncs (O_DIRECT alone does not flush the disk's cache or the file's metadata).
    Keys must be written in declared order (one front-to-back pass; ValueError otherwise).
    """

    def __init__(self, path: str | Path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        if not _O_DIRECT:
            raise DirectIOUnsupported(errno.EINVAL, "O_DIRECT is not available on this platform")
        self.path = Path(path)
        self.specs = dict(specs)
        prefix, _, total = _layout(self.specs, metadata)
        self._order = list(self.specs)
        self._index = {k: i for i, k in enumerate(self._order)}
        self._sizes = [_numel(shape) * _itemsize(dtype) for dtype, shape in self.specs.values()]
        self._size = len(prefix) + total
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o666)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise DirectIOUnsupported(e.errno, f"{self.path}: the file system refuses O_DIRECT") from e
            raise
        try:
            self._plain_fd = os.open(self.path, os.O_WRONLY)  # the unaligned tail, and the fallback
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        try:
            self._setup(prefix)
        except BaseException:
            os.close(self._fd)
            os.close(self._plain_fd)
            self._fd = None
            raise

    def _setup(self, prefix: bytes) -> None:
        self.direct = True
        self.fsync_s = 0.0
        self.io_s = 0.0  # time the I/O thread spent in writes (the disk's share of a merge)
        self._lock = threading.Lock()
        self._free_lock = threading.Lock()  # the I/O thread returns buffers
        self._free: list[torch.Tensor] = []  # written staging buffers, reused
        self._views: dict[int, torch.Tensor] = {}  # key index -> its bytes in a chunk (reserved, not yet written)
        self._reserved = 0  # keys [0, _reserved) have their place in a chunk
        self._written = 0  # keys [0, _written) are written
        self._sealed: deque[_Chunk] = deque()  # full chunks waiting for their last key to be written
        self._cur = _Chunk(0, len(prefix), self._alloc(len(prefix)))
        self._cur.buf[:len(prefix)].copy_(torch.frombuffer(bytearray(prefix), dtype=torch.uint8))
        self._queue: queue.Queue[tuple[_Chunk, int] | None] = queue.Queue(maxsize=DIRECT_QUEUE)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._io_loop, name="merge-direct-io", daemon=True)
        self._thread.start()

    # -- the caller's side ----------------------------------------------------------------------------------------

    def buffer(self, key: str) -> torch.Tensor | None:
        """The key's place in the output (dtype and shape as declared), valid until the key is written; None when
        its bytes are not aligned for its dtype (then `write` copies). Call in declared order, like `write`."""
        i = self._index[key]
        dtype, shape = self.specs[key]
        with self._lock:
            if i < self._written:
                raise ValueError(f"{key} written twice")
            self._reserve_through(i)
            view = self._views[i]
        if view.data_ptr() % _itemsize(dtype):
            return None
        return view.view(dtype).view(tuple(shape))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.specs[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{key}: declared {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        self._check_open()
        i = self._index[key]
        with self._lock:
            if i < self._written:
                raise ValueError(f"{key} written twice")
            if i != self._written:
                raise ValueError(f"{key}: an O_DIRECT writer takes the keys in declared order; "
                                 f"'{self._order[self._written]}' comes first")
            self._reserve_through(i)
            view = self._views.pop(i)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # little-endian on every supported host
        if data.data_ptr() != view.data_ptr():  # not built in place (buffer() unused, or a key copied as it is)
            view.copy_(data)
        del view, data
        with self._lock:
            self._written += 1
            ready = []
            while self._sealed and self._sealed[0].last < self._written:
                ready.append(self._sealed.popleft())
        for chunk in ready:
            self._send(chunk)

    def close(self, fsync: bool = True) -> None:
        """Check every key was written, write what is left, fsync (unless told not to) and close."""
        if self._fd is None:
            return
        if self._written < len(self._order):
            missing = len(self._order) - self._written
            self.abort()
            raise ValueError(f"{self.path}: {missing} declared tensors never written, e.g. "
                             f"{self._order[-missing]}")
        try:
            with self._lock:
                ready, last = list(self._sealed), self._cur
                self._sealed.clear()
            for chunk in ready:
                self._send(chunk)
            aligned = last.end - last.end % DIRECT_ALIGN
            tail = bytes(last.buf[aligned - last.start:last.end - last.start].numpy())
            self._send(last)  # its aligned part
            self._queue.put(None)
            self._thread.join()
            if self._error is not None:
                raise self._error
            _pwrite_all(self._plain_fd, tail, aligned)
            if os.fstat(self._plain_fd).st_size != self._size:
                os.ftruncate(self._plain_fd, self._size)
            if fsync:
                t0 = time.perf_counter()
                os.fsync(self._plain_fd)  # per file, not per descriptor: covers the direct writes too
                self.fsync_s = time.perf_counter() - t0
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the I/O thread and close without checks (the merge failed; atomic_path removes the file)."""
        if self._fd is None:
            return
        self._stop = True
        if self._thread.is_alive():
            self._queue.put(None)  # the thread skips what is queued before it, so this cannot wait long
            self._thread.join()
        os.close(self._fd)
        os.close(self._plain_fd)
        self._fd = None
        self._views.clear()
        self._sealed.clear()
        self._free.clear()

    # -- staging ----------------------------------------------------------------------------------------------------

    def _reserve_through(self, index: int) -> None:
        """Give keys up to `index` their places, in order (under the lock)."""
        while self._reserved <= index:
            i = self._reserved
            n = self._sizes[i]
            cur = self._cur
            if cur.end - cur.start + n > cur.buf.numel():
                start = cur.end - cur.end % DIRECT_ALIGN
                nxt = _Chunk(start, cur.end, self._alloc(cur.end - start + n))
                cur.next = nxt
                self._sealed.append(cur)
                self._cur = cur = nxt
            lo = cur.end - cur.start
            self._views[i] = cur.buf[lo:lo + n]
            cur.end += n
            cur.last = i
            self._reserved += 1

    def _send(self, chunk: _Chunk) -> None:
        """Queue a chunk's aligned part for the I/O thread, after moving its unaligned tail into the next chunk."""
        aligned = chunk.end - chunk.end % DIRECT_ALIGN
        if chunk.next is not None and chunk.end > aligned:
            chunk.next.buf[:chunk.end - aligned].copy_(chunk.buf[aligned - chunk.start:chunk.end - chunk.start])
        while True:  # wait for room, unless the I/O thread has stopped for an error
            self._check_open()
            try:
                self._queue.put((chunk, aligned - chunk.start), timeout=0.1)
                return
            except queue.Full:
                continue

    def _check_open(self) -> None:
        if self._fd is None:
            raise ValueError("write after close")
        if self._error is not None:
            raise self._error

    def _alloc(self, nbytes: int) -> torch.Tensor:
        """A page-aligned uint8 buffer of at least max(nbytes, DIRECT_CHUNK_BYTES) bytes, reused when one is free."""
        need = max(DIRECT_CHUNK_BYTES, -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN)
        with self._free_lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= need]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        raw = torch.empty(need + DIRECT_ALIGN, dtype=torch.uint8)
        shift = -raw.data_ptr() % DIRECT_ALIGN
        return raw[shift:shift + need]

    def _release(self, buf: torch.Tensor) -> None:
        with self._free_lock:
            self._free.append(buf)
            while sum(b.numel() for b in self._free) > DIRECT_FREE_BYTES:  # drop the largest (by index: tensors'
                self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].numel()))  # == is elementwise)

    def _io_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            chunk, n = item
            try:
                if n and not self._stop and self._error is None:
                    t0 = time.perf_counter()
                    self._write_out(chunk.buf[:n], chunk.start)
                    self.io_s += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - raised by the next write or close on the caller's side
                self._error = e
            finally:
                self._release(chunk.buf)
                del chunk, item

    def _write_out(self, buf: torch.Tensor, offset: int) -> None:
        view = memoryview(buf.numpy())
        while view:
            if self.direct:
                try:
                    n = os.pwrite(self._fd, view, offset)  # type: ignore[arg-type]
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct = False  # refused: this write and the later ones through the page cache
                    continue
            else:
                n = os.pwrite(self._plain_fd, view, offset)
            view, offset = view[n:], offset + n


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:  # pwrite may write less than asked (signals, some file systems)
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _layout(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None
            ) -> tuple[bytes, dict[str, int], int]:
    """(length prefix + JSON header, each key's offset in the data area, data size) of a safetensors file holding
    `specs` in their order. The header is padded with spaces to a multiple of 8 bytes, as safetensors writes it (the
    format allows trailing whitespace in the header), so the data area starts 8-byte aligned."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets: dict[str, int] = {}
    pos = 0
    for key, (dtype, shape) in specs.items():
        nbytes = _numel(shape) * _itemsize(dtype)
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[key] = pos
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets, pos


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
