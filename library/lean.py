"""Keep third-party packages from importing, at start-up, an optional package this run does not use.

diffusers (its bitsandbytes quantizer module) and peft (`peft.helpers`) import bitsandbytes whenever it is installed,
and importing bitsandbytes runs `torch.compile` decorators that import TorchInductor: a one-step run on the tiny model
took 19.5 s with it and 15.5 s without on 2 CPU cores (bench/bench_start.py), time spent for 8-bit and 4-bit model
quantization, which this toolkit does not use.
So the scripts start with bitsandbytes blocked, and unblock it where it is used: the 8-bit optimizers
(library/training/optim.py). Blocking is Python's own mechanism: with `sys.modules[name] = None`, `import name`
raises ImportError and `importlib.util.find_spec(name)` answers None, which diffusers and peft both take as "not
installed". No package offers a switch for this, hence the few lines here.
"""

from __future__ import annotations

import sys

UNUSED_AT_START = ("bitsandbytes",)
# Packages that look for bitsandbytes once and remember the answer (diffusers at import, transformers in a cached
# check): imported before the block, they may have found it and would then fail on the blocked import.
CHECKERS = ("diffusers", "transformers", "peft", "accelerate")
_blocked: set[str] = set()


def block_unused() -> None:
    """Block the packages of UNUSED_AT_START that are not imported yet, at a fresh start only: not once a CHECKER
    is imported (a script's start imports none of them before this; a test or notebook may have)."""
    if any(name in sys.modules for name in CHECKERS):
        return
    for name in UNUSED_AT_START:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
            _blocked.add(name)


def unblock(name: str) -> None:
    """Let `import name` work again if block_unused blocked it; a block set by anyone else stays."""
    if name in _blocked:
        _blocked.discard(name)
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


def unblock_all() -> None:
    for name in list(_blocked):
        unblock(name)
