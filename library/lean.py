"""Keep third-party packages from importing, at start-up, what this run does not use.

Two mechanisms, both set by `block_unused()` at a script's fresh start (library/cli.py) and undone by
`unblock_all()`:

1. Blocked packages (UNUSED_AT_START). diffusers (its bitsandbytes quantizer module) and peft (`peft.helpers`)
   import bitsandbytes whenever it is installed, and importing bitsandbytes runs `torch.compile` decorators that
   import TorchInductor: a one-step run on the tiny model took 19.5 s with it and 15.5 s without on 2 CPU cores
   (bench/bench_start.py). transformers imports scipy.optimize for an object-detection loss
   (`transformers.loss.loss_for_object_detection`) and diffusers imports scipy.stats for beta-distributed sampler
   sigmas (`use_beta_sigmas`, which no SD/SDXL scheduler config sets): about 1 s of a start spent for nothing here.
   Blocking is Python's own mechanism: with `sys.modules[name] = None`, `import name` raises ImportError and
   `importlib.util.find_spec(name)` answers None, which diffusers, transformers and peft all take as "not
   installed". Code that uses a blocked package unblocks it first: the 8-bit optimizers (library/training/optim.py)
   for bitsandbytes, the dataset doctor's image hashes (library/data/imagestats.py, imagehash) for scipy.
2. Deferred package inits (DEFERRED_INITS). Importing any diffusers UNet or VAE runs the `__init__.py` of its
   package, and those import every model of their kind: `diffusers.models.transformers` imports 80 transformer
   models (and with them single-file loaders, schedulers, image processors), `diffusers.models.unets` 11 UNets,
   `diffusers.models.autoencoders` 20 VAEs, `diffusers.hooks` every inference hook, and `transformers.models`
   scans the folders of its ~560 model types to build its lazy index (0.6 s on 2 CPU cores, measured with
   `-X importtime`; the CLIP modules we use are imported by their paths). A deferred package is created
   without running its `__init__.py`; its submodules import as usual (`diffusers.models.unets.unet_2d_condition`
   loads that file only), and the first lookup of a name the package does not hold yet runs the real `__init__.py`
   (PEP 562 module `__getattr__`), so `from diffusers.models.unets import UNet2DConditionModel` and every other use
   work as before. No package offers a switch for either, hence the few lines here.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

UNUSED_AT_START = ("bitsandbytes", "scipy")
DEFERRED_INITS = (
    "diffusers.models.autoencoders", "diffusers.models.controlnets", "diffusers.models.transformers",
    "diffusers.models.unets", "diffusers.hooks", "transformers.models",
)
# Packages that look for the blocked ones once and remember the answer (diffusers at import, transformers in a cached
# check): imported before the block, they may have found them and would then fail on the blocked import.
CHECKERS = ("diffusers", "transformers", "peft", "accelerate")
_blocked: set[str] = set()


class _DeferredInit(importlib.abc.Loader):
    """Creates the package module as the real loader would, without executing its `__init__.py` until needed."""

    def __init__(self, real: importlib.abc.Loader):
        self.real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        real = self.real

        def __getattr__(name: str) -> Any:
            if name.startswith("__"):  # dunder probes (__path__ is set; __all__, __wrapped__, ...) stay misses
                raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
            module.__dict__.pop("__getattr__", None)  # from here on, ordinary module semantics
            real.exec_module(module)  # the package's own __init__.py, in its own namespace
            return getattr(sys.modules[module.__name__], name)

        module.__getattr__ = __getattr__  # type: ignore[attr-defined]


class _DeferringFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in DEFERRED_INITS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and spec.submodule_search_locations is not None:
            spec.loader = _DeferredInit(spec.loader)
        return spec


_FINDER = _DeferringFinder()


def block_unused() -> None:
    """Block the packages of UNUSED_AT_START that are not imported yet, and defer DEFERRED_INITS, at a fresh start
    only: not once a CHECKER is imported (a script's start imports none of them before this; a test or notebook
    may have)."""
    if any(name in sys.modules for name in CHECKERS):
        return
    for name in UNUSED_AT_START:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
            _blocked.add(name)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def unblock(name: str) -> None:
    """Let `import name` work again if block_unused blocked it; a block set by anyone else stays."""
    if name in _blocked:
        _blocked.discard(name)
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


def unblock_all() -> None:
    """Undo block_unused: packages importable again, no further deferral (packages already deferred keep working:
    their first unknown name runs their `__init__.py`)."""
    for name in list(_blocked):
        unblock(name)
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
