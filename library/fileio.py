"""Atomic file output: write to a temporary name in the same folder, fsync, then rename.

A crash, a kill or a full disk leaves either the old file or the new one, never a truncated one. What a killed
process leaves behind is only its hidden temporary (`.<name>.tmp-<pid>`) or, for a folder replaced at the instant of
the kill, the previous folder under `.<name>.old-<pid>`; `recover_interrupted_writes` removes or restores those when
the next run starts. A write that fails for lack of space (full disk, quota, file-size limit, read-only disk) raises
`OutputWriteError`, one line naming the file and the cause, after removing its temporary.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from library.errors import UserError

# Causes a user fixes outside the program (free space, raise the limit, remount): reported in one line, no traceback.
_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


class OutputWriteError(UserError):
    """An output file could not be written for lack of space or permission; nothing older was replaced."""

    exit_code = 4


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on error it is removed.

    Works for files and for folders (a folder replaces the old one only once it is complete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        for f in [tmp] if tmp.is_file() else sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync(f)
        if tmp.is_file():
            # Some writers (safetensors) create files 0600; give the result the usual umask-based mode.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException as exc:
        reason = _disk_failure(tmp, exc) if isinstance(exc, Exception) else None
        _remove(tmp)
        if reason is not None:
            raise OutputWriteError(f"cannot write {path}: {reason}; nothing older was replaced") from exc
        raise


def _disk_failure(tmp: Path, exc: Exception) -> str | None:
    """The cause, when writing under `tmp` failed for lack of space or a read-only disk; else None.

    Python's own writes raise OSError with the errno, safetensors a SafetensorError ending "(os error 27)". torch.save
    reports it as a RuntimeError ("unexpected pos ...") without an errno: so a few bytes are appended with a plain
    write to the file written last (torch leaves it truncated), which fails the same way and tells why.
    """
    if isinstance(exc, UserError):
        return None
    if isinstance(exc, OSError):
        return _reason(exc) if exc.errno in _DISK_ERRNOS else None
    rust = re.search(r"\(os error (\d+)\)", str(exc))  # safetensors deletes its partial file: the errno is all
    if rust:
        code = int(rust.group(1))
        return _reason(OSError(code, os.strerror(code))) if code in _DISK_ERRNOS else None
    files = [tmp] if tmp.is_file() else sorted((p for p in tmp.rglob("*") if p.is_file()), key=_mtime)
    probe = files[-1] if files else tmp.with_name(tmp.name + ".probe")
    try:
        with open(probe, "ab") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return _reason(err) if err.errno in _DISK_ERRNOS else None
    finally:
        if not files:
            with contextlib.suppress(OSError):
                probe.unlink()
    return None


def _reason(err: OSError) -> str:
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
            errno.EFBIG: "raise the limit (ulimit -f) or use a file system without it",
            errno.EROFS: "choose a writable save.output_dir"}[err.errno]
    return f"{os.strerror(err.errno).lower()} ({errno.errorcode[err.errno]}; {hint})"


def _mtime(p: Path) -> float:
    return p.stat().st_mtime_ns


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover_interrupted_writes(folder: str | os.PathLike) -> list[Path]:
    """Clean up after writers that were killed (see the module doc); returns the paths removed or restored.

    Temporaries of a dead process are removed. A `.<name>.old-<pid>` folder is put back as `<name>` if the kill fell
    between the two renames of a folder replacement (so `<name>` is missing), else removed. Leftovers of processes
    still alive (another rank, a parallel run) are not touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    touched = []
    for p in sorted(folder.rglob(".*")):
        m = _LEFTOVER.match(p.name)
        if m is None or _alive(int(m.group("pid"))) or not (p.exists() or p.is_symlink()):
            continue
        target = p.with_name(m.group("name"))
        if m.group("kind") == "old" and not target.exists():
            os.replace(p, target)
        else:
            _remove(p)
        touched.append(p)
    return touched


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_atomic(path: str | os.PathLike) -> None:
    """Delete a file or folder so that a kill part-way leaves no half-deleted folder under its name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    os.replace(path, tmp)
    _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
