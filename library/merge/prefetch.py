"""Start reading a merge's input files while the interpreter is still importing torch.

Importing torch takes about 3 s of CPU (8 s of wall time on a loaded 2-core machine), and a merge cannot start before
it: with inputs that are not in the page cache the disk would sit idle that long. `start_prefetch` reads the start of
each input into the page cache on a daemon thread, in STEP-sized pieces taken from the inputs in turn (as the merge
will read them), up to PREFETCH_BYTES per file or a quarter of the free memory in all. Each piece is mapped and
populated (madvise MADV_POPULATE_READ through ctypes, which releases the GIL: the import goes on meanwhile) and
unmapped: no copy into this process, and the pages stay in the page cache for the merge's reads. posix_fadvise
(POSIX_FADV_WILLNEED) was tried first: it returned at once and, two seconds later, only 12% of a 1 GB file was cached.
Where the files are cached already it costs a mapping per piece. Imports nothing heavy: call it before torch.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from library.config.merge import NEEDS, TASK_MODES, MergeRecipe

PREFETCH_BYTES = 2 << 30  # per input, at most
STEP = 32 << 20  # mapped at a time (resident while mapped)


def input_refs(cfg: MergeRecipe) -> list[str]:
    """The checkpoints a checkpoint merge reads (none for the LoRA modes, which read LoRAs first)."""
    m = cfg.merge
    if m.mode in TASK_MODES:
        return [m.model_a, *m.models]
    if m.mode.startswith("lora_"):
        return []
    return [getattr(m, k) for k in NEEDS[m.mode]]


def start_prefetch(refs: Iterable[str]) -> threading.Thread | None:
    """Prefetch the single-file `.safetensors` inputs among `refs` (others are left alone); the thread, or None."""
    if not sys.platform.startswith("linux"):
        return None
    paths = []
    for ref in refs:
        p = Path(ref).expanduser() if ref and not ref.startswith("tiny:") else None
        if p is not None and p.suffix.lower() == ".safetensors" and p.is_file():
            paths.append(p)
    if not paths:
        return None
    limit = PREFETCH_BYTES
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        limit = min(limit, free // 4 // len(paths))
    except (ValueError, OSError):
        pass
    thread = threading.Thread(target=_prefetch, args=(paths, limit), name="merge-prefetch", daemon=True)
    thread.start()
    return thread


def _prefetch(paths: list[Path], limit: int) -> None:
    import ctypes
    import mmap

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    populate = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.11's mmap lacks the name
    files = []
    try:
        for p in paths:
            try:
                files.append((open(p, "rb"), min(limit, p.stat().st_size)))  # noqa: SIM115 - closed below
            except OSError:
                continue  # the merge reports unreadable inputs itself
        for start in range(0, limit, STEP):
            for f, size in files:
                if start >= size:
                    continue
                with mmap.mmap(f.fileno(), min(STEP, size - start), access=mmap.ACCESS_COPY, offset=start) as m:
                    anchor = ctypes.c_char.from_buffer(m)  # private map: writable for ctypes, the file untouched
                    try:
                        if madvise(ctypes.addressof(anchor), len(m), populate) != 0:
                            return  # an older kernel: no prefetch
                    finally:
                        del anchor
    except (OSError, ValueError, BufferError):
        pass  # only a head start: the merge reads everything itself
    finally:
        for f, _ in files:
            f.close()


def cached_fraction(path: str | Path) -> float:
    """The share of a file's pages in the page cache (mincore(2) on a map of the file; nothing is read)."""
    import ctypes
    import mmap

    size = Path(path).stat().st_size
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            if libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del anchor
    return sum(v & 1 for v in vec) / pages
