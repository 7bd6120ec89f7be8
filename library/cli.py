"""Entry-point helpers shared by every script."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from library.errors import UserError


def main_guard(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Run a script's main(); a UserError becomes one `error: ...` line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
