"""Streaming safetensors output for merges (inputs: `library.merge.stream`).

`SafetensorsWriter` writes the header first (every key's dtype, shape and offsets are known before merging)
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
import os
import queue
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping

import torch

from library.merge.tensor_file import DTYPE_NAMES


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


class WriterGroup:
    """The weight files a diffusers-folder output writes (one per component, in `_opened`): timing, direct-I/O
    state, close and abort over all of them."""

    _opened: list[SafetensorsWriter | DirectSafetensorsWriter]

    @property
    def fsync_s(self) -> float:
        return sum(w.fsync_s for w in self._opened)

    @property
    def direct(self) -> bool:
        return bool(self._opened) and all(w.direct for w in self._opened)

    def buffer(self, key: str) -> None:
        return None  # keys are split into diffusers tensors on the way: built elsewhere

    def close(self) -> None:
        for w in self._opened:
            w.close()

    def abort(self) -> None:
        for w in self._opened:
            w.abort()
