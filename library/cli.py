"""Entry-point helpers shared by every script."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from library.errors import UserError
from library.lean import block_unused, collect_less_during_start, freeze_for_exit, unblock_all

# Every script imports this module first: its imports run with fewer cyclic collections (library/lean.py, 5).
collect_less_during_start()


def main_guard(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Run a script's main(); a UserError becomes one `error: ...` line on stderr and its exit code. Optional
    packages the run does not use stay unimported meanwhile (library/lean.py)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        block_unused()
        try:
            return fn(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            unblock_all()  # main() called in-process (tests) leaves the interpreter as it found it
            freeze_for_exit()

    return wrapper
