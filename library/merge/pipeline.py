"""A three-stage pipeline for streaming merges: read on one thread, compute on the caller's, write on a third.

Input reads (per-tensor maps populated by madvise through ctypes), file writes (`os.pwrite`) and torch's kernels
all release the GIL, so while key i is merged, key i + 1 is being read and key i - 1 written: the wall time
approaches the slowest stage instead of the sum of all three. Items keep their order (one thread per stage, FIFO
queues).

Memory stays bounded by a token count, not by queue lengths: an item takes a token before it is read and gives it
back once written, so at most `in_flight` items exist at any moment. That is also what makes buffer rings safe: a
reader that reuses `in_flight` buffers in turn (stream.SafetensorsFile, recipe.OutputRing) never overwrites the
buffer of an item that is still queued, being merged or being written.

An exception in any stage stops the others, is raised in the caller's thread (the original exception object, with
its traceback), and nothing more is written after it.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")

_END = object()


@dataclass
class StageTimes:
    """Seconds each stage spent working (not waiting for the others); their sum over the wall time is the overlap."""

    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def run_pipeline(items: Sequence[T], read: Callable[[T], R], compute: Callable[[T, R], W],
                 write: Callable[[T, W], None], *, in_flight: int = 4) -> StageTimes:
    """For each item in order: `read(item)` on a reader thread, `compute(item, read_result)` on this thread,
    `write(item, computed)` on a writer thread. At most `in_flight` (>= 1) items are between the start of their read
    and the end of their write. Returns the busy time of each stage."""
    if in_flight < 1:
        raise ValueError("in_flight must be at least 1")
    times = StageTimes()
    tokens = threading.Semaphore(in_flight)
    stop = threading.Event()
    to_compute: queue.SimpleQueue[Any] = queue.SimpleQueue()
    to_write: queue.SimpleQueue[Any] = queue.SimpleQueue()
    write_error: list[BaseException] = []

    def reader() -> None:
        end: Any = _END  # always sent last, so the caller's thread never waits for an item that will not come
        try:
            for item in items:
                while not tokens.acquire(timeout=0.05):  # wait for a free slot, or for the others to give up
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                value = read(item)
                times.read_s += time.perf_counter() - t0
                to_compute.put((item, value))
                del value
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
            end = _Failure(e)
        finally:
            to_compute.put(end)

    def writer() -> None:
        while True:
            got = to_write.get()
            if got is _END:
                return
            item, value = got
            try:
                if not stop.is_set():
                    t0 = time.perf_counter()
                    write(item, value)
                    times.write_s += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                write_error.append(e)
                stop.set()
            finally:
                del got, item, value
                tokens.release()

    start = time.perf_counter()
    threads = [threading.Thread(target=reader, name="merge-read", daemon=True),
               threading.Thread(target=writer, name="merge-write", daemon=True)]
    for t in threads:
        t.start()
    try:
        while True:
            got = to_compute.get()
            if got is _END:
                break
            if isinstance(got, _Failure):
                raise got.error
            if write_error:
                break
            item, value = got
            del got
            t0 = time.perf_counter()
            result = compute(item, value)
            times.compute_s += time.perf_counter() - t0
            del value
            to_write.put((item, result))
            del result
    except BaseException:
        stop.set()
        raise
    finally:
        to_write.put(_END)
        for t in threads:
            t.join()
    if write_error:
        raise write_error[0]
    times.wall_s = time.perf_counter() - start
    return times
