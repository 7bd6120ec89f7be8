"""A lean start: third-party packages import only what this run uses, and the start's objects cost no collections.

Mechanisms 1 to 4 are set by `block_unused()` at a script's fresh start (library/cli.py) and undone by
`unblock_all()`; mechanism 5 belongs to script processes only:

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
   work as before. A name that is a submodule of the package imports that submodule only. No package offers a
   switch for either, hence the few lines here.
3. transformers' lazy index, cached (AFTER_EXEC). transformers' own `__init__.py` (5.x) reads every file of its
   ~560 model folders to learn which module defines which name (`define_import_structure`), at every start: diffusers'
   LoRA loader, which every UNet imports, asks it for `PreTrainedModel`. The index depends only on the installed
   transformers, so it is computed once per installed version (keyed by its version and the models folder's
   modification time), kept as JSON in the cache folder (library/paths.py) and handed to transformers' function
   from then on; everything else in its __init__.py runs as usual.
4. `importlib.metadata.packages_distributions()`, cached (`_cached_packages_distributions`). diffusers calls it
   when its utils import (to map import names to distributions), and it reads the file list of every installed
   distribution: 0.19 s of each start on 2 CPU cores with this toolkit's requirements installed. Its answer depends
   only on what is installed on `sys.path`, so it is kept as JSON in the cache folder with the modification times of
   the `sys.path` folders (installing or removing a package changes its folder's; the toolkit's own folder is left
   out), and recomputed when they differ.
5. The cyclic garbage collector, collecting less while a script starts and frozen once it has (`gc.freeze`: every
   object tracked so far moves to a generation no collection walks). Importing torch, TorchDynamo, diffusers,
   transformers and peft creates ~400k objects that live as long as the process; every collection of the oldest
   generation walks all of them again, and the interpreter's final collections at exit once more. On 2 CPU cores
   a tiny run took 7.97 s as CPython collects by default and 6.6 s with young collections every 10,000 allocations
   (not 700) until its model is loaded, then one full collection (so nothing unreachable is frozen: a frozen
   reference cycle would hold its tensors to the end), frozen from then on, and frozen again when main() returns
   (the exit after a tiny run: 1.3 s, 0.2 s frozen). Switching the collector off instead: 0.2 s faster, +8 MiB.
   A script started as `python <script>.py` sets this from its first import (library/cli.py) to the end of its
   model load (library/training/run.py), or to the end of main() where it loads none; a main() called in-process
   (tests, notebooks) is untouched. `start_done` also hands the C heap's free pages back to the system (glibc
   `malloc_trim`): the tokenizer's JSON parse and the model build leave 27 MiB free inside it, and a tiny run's
   peak RSS fell from 463 to 449 MiB. `gc.freeze` is CPython's own tool for this
   (https://docs.python.org/3/library/gc.html#gc.freeze); no package does it for us.
"""

from __future__ import annotations

import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

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
        real, package = self.real, module.__name__

        def __getattr__(name: str) -> Any:
            if name.startswith("__"):  # dunder probes (__path__ is set; __all__, __wrapped__, ...) stay misses
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            if importlib.util.find_spec(f"{package}.{name}") is not None:  # `from . import sub`: that file only
                return importlib.import_module(f"{package}.{name}")
            module.__dict__.pop("__getattr__", None)  # from here on, ordinary module semantics
            real.exec_module(module)  # the package's own __init__.py, in its own namespace
            final = sys.modules[package]
            if final is not module:  # the __init__ put a lazy module in its place (transformers): forward to it
                module.__getattr__ = lambda n: getattr(final, n)  # type: ignore[attr-defined]
            return getattr(final, name)

        module.__getattr__ = __getattr__  # type: ignore[attr-defined]


class _PatchAfterExec(importlib.abc.Loader):
    """Runs the module as the real loader would, then `patch(module)` (AFTER_EXEC)."""

    def __init__(self, real: importlib.abc.Loader, patch: Callable[[ModuleType], None]):
        self.real, self.patch = real, patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        self.patch(module)


class _DeferringFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in DEFERRED_INITS and name not in AFTER_EXEC:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        if name in AFTER_EXEC:
            spec.loader = _PatchAfterExec(spec.loader, AFTER_EXEC[name])
        elif spec.submodule_search_locations is not None:
            spec.loader = _DeferredInit(spec.loader)
        return spec


_FINDER = _DeferringFinder()


def _cache_transformers_index(import_utils: ModuleType) -> None:
    """Answer `define_import_structure` of transformers' models folder from the cache (written on a miss). Any
    failure to read or write the cache just computes the index as transformers does."""
    real = getattr(import_utils, "define_import_structure", None)
    if real is None:  # another transformers: nothing to speed up
        return
    memo: dict[str, Any] = {}

    def define_import_structure(module_path: Any, prefix: str | None = None) -> Any:
        path = Path(module_path)
        if prefix != "models" or path.name != "models":
            return real(module_path, prefix)
        from importlib.metadata import version

        from library.paths import cache_dir

        try:  # no installed metadata (a source checkout on sys.path), no home folder: no cache
            key = f"transformers-{version('transformers')}-{path.stat().st_mtime_ns}"
            file = cache_dir() / "lean" / f"{key}.json"
        except Exception:
            return real(module_path, prefix)
        if key not in memo:  # transformers runs its __init__.py twice (processing_utils imports it directly)
            memo[key] = _read_index(file) or _write_index(file, real(module_path, prefix))
        return memo[key]

    define_import_structure.__wrapped__ = real  # type: ignore[attr-defined]
    import_utils.define_import_structure = define_import_structure


def _read_index(path: Path) -> Any:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return {frozenset(backends): {m: set(names) for m, names in mods.items()} for backends, mods in rows}
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable, or JSON of another shape
        return None


def _write_index(path: Path, index: Any) -> Any:
    try:
        rows = [[sorted(b), {m: sorted(n) for m, n in mods.items()}] for b, mods in index.items()]
    except (TypeError, AttributeError):  # an index of another shape is not cached
        return index
    _write_cache(path, rows)
    return index


def _write_cache(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, atomically (library/fileio.py); a cache that cannot be written is simply not kept."""
    from library.errors import UserError
    from library.fileio import write_text_atomic

    try:
        write_text_atomic(path, json.dumps(data))
    except (OSError, UserError, TypeError, ValueError):  # no space, read-only cache folder, not JSON-able
        pass


# Modules patched right after they execute (before anything can call them).
AFTER_EXEC: dict[str, Callable[[ModuleType], None]] = {"transformers.utils.import_utils": _cache_transformers_index}


_real_packages_distributions = importlib.metadata.packages_distributions


def _cached_packages_distributions() -> Any:
    """`importlib.metadata.packages_distributions()`, from the cache folder while no `sys.path` folder has changed
    since it was written. Any failure to read or write the cache computes it as the standard library does."""
    from library.paths import REPO_ROOT, cache_dir

    def stamp(entry: str) -> int | None:
        try:
            return os.stat(entry or ".").st_mtime_ns
        except OSError:
            return None

    # The toolkit's own folder (a script's sys.path[0]) holds no installed distribution; its time changes with
    # every file written into it, and each checkout has its own.
    key = [[entry, stamp(entry)] for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]
    file = cache_dir() / "lean" / "packages_distributions.json"
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
        if cached["sys_path"] == key and all(isinstance(v, list) for v in cached["packages"].values()):
            return cached["packages"]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # none yet, unreadable, another shape
        pass
    packages = _real_packages_distributions()
    _write_cache(file, {"sys_path": key, "packages": packages})
    return packages


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
    importlib.metadata.packages_distributions = _cached_packages_distributions


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
    importlib.metadata.packages_distributions = _real_packages_distributions


# Mechanism 5.
START_GC_THRESHOLD = 10_000  # allocations between young collections while a script starts (CPython's default: 700)
_threshold_before_start: tuple[int, ...] | None = None


def started_as_script() -> bool:
    """This process runs one of the toolkit's scripts as `__main__` (`python train_lora.py ...`), not a test runner,
    a notebook or `python -c`."""
    from library.paths import REPO_ROOT

    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is not None and Path(main_file).resolve().parent == REPO_ROOT


def collect_less_during_start() -> None:
    """In a script process: young collections every START_GC_THRESHOLD allocations until `start_done`."""
    global _threshold_before_start
    if _threshold_before_start is None and started_as_script():
        _threshold_before_start = gc.get_threshold()
        gc.set_threshold(START_GC_THRESHOLD, *_threshold_before_start[1:])


def start_done() -> None:
    """After the model is loaded, in a script process: freeze every object the start made (no collection walks them
    again), collect as usual from here on, and hand the heap's free pages back to the system."""
    if _threshold_before_start is not None:
        gc.collect()  # nothing unreachable is frozen (a reference cycle frozen would hold its tensors to the end)
        gc.freeze()
        _restore_thresholds()
        release_free_heap()


def freeze_for_exit() -> None:
    """At the end of a script process's main(): the interpreter's final collections skip what exists now."""
    _restore_thresholds()  # a script that loaded no model (merge, check_dataset): its start ends here
    if started_as_script():
        gc.freeze()


def _restore_thresholds() -> None:
    global _threshold_before_start
    if _threshold_before_start is not None:
        gc.set_threshold(*_threshold_before_start)
        _threshold_before_start = None


def release_free_heap() -> bool:
    """glibc's `malloc_trim(0)`: return the free pages inside the C heap to the system (what the tokenizer's JSON
    parse and the model build freed stays in the process otherwise: 27 MiB of a tiny run's 434 MiB). False where
    the C library has no such call (not glibc). The standard library has no binding for it, hence ctypes."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
