"""A script's start imports no optional package it does not use (library/lean.py), and prints no warnings about
packages it does not need (the pipeline's image processors, library/training/sample.py)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import textwrap
import types

import pytest

from library import lean
from tests.tinyrun import REPO, script_env, write_config


def test_block_unused_hides_a_package_until_unblocked(monkeypatch):
    name = "tabnanny"  # a standard-library module nothing here imports
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(lean, "UNUSED_AT_START", (name,))
    monkeypatch.setattr(lean, "CHECKERS", ())  # as at a script's start (this process has imported diffusers)
    assert importlib.util.find_spec(name) is not None
    lean.block_unused()
    try:
        assert importlib.util.find_spec(name) is None  # what diffusers and peft ask: "not installed"
        with pytest.raises(ImportError):
            importlib.import_module(name)
    finally:
        lean.unblock(name)
    assert importlib.import_module(name).__name__ == name


def test_unblock_leaves_a_block_it_did_not_set(monkeypatch):
    monkeypatch.setitem(sys.modules, "tabnanny", None)  # someone else's block (tests/test_optim.py does this)
    monkeypatch.setattr(lean, "UNUSED_AT_START", ("tabnanny",))
    monkeypatch.setattr(lean, "CHECKERS", ())
    lean.block_unused()
    lean.unblock("tabnanny")
    assert sys.modules["tabnanny"] is None


def test_no_block_once_a_package_that_checks_for_it_is_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "tabnanny", raising=False)
    monkeypatch.setattr(lean, "UNUSED_AT_START", ("tabnanny",))
    monkeypatch.setattr(lean, "CHECKERS", ("json",))  # imported: it may have found the package already
    lean.block_unused()
    assert "tabnanny" not in sys.modules and importlib.util.find_spec("tabnanny") is not None


def test_deferred_package_init_runs_on_first_unknown_name(tmp_path, monkeypatch):
    """A deferred package imports its submodules without running its __init__.py; the first name it does not hold
    yet runs it, after which the package is as if imported normally."""
    pkg = tmp_path / "deferpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import sys\nsys.deferpkg_inits += 1\nfrom .sub import VALUE as EXPORTED\n")
    (pkg / "sub.py").write_text("VALUE = 42\n")
    (pkg / "other.py").write_text("OTHER = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "deferpkg_inits", 0, raising=False)
    monkeypatch.setattr(lean, "UNUSED_AT_START", ())
    monkeypatch.setattr(lean, "DEFERRED_INITS", ("deferpkg",))
    monkeypatch.setattr(lean, "CHECKERS", ())
    for name in ("deferpkg", "deferpkg.sub", "deferpkg.other"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    lean.block_unused()
    try:
        sub = importlib.import_module("deferpkg.sub")
        assert sub.VALUE == 42 and sys.deferpkg_inits == 0
        parent = sys.modules["deferpkg"]
        assert parent.sub is sub and not hasattr(parent, "__all__")  # known names and dunder probes: no init
        assert sys.deferpkg_inits == 0
        from deferpkg import EXPORTED  # a name only __init__.py defines

        assert EXPORTED == 42 and sys.deferpkg_inits == 1
        assert importlib.import_module("deferpkg.other").OTHER == 7 and parent.sub is sub
        with pytest.raises(AttributeError):
            parent.MISSING
        assert sys.deferpkg_inits == 1  # ran once
    finally:
        lean.unblock_all()
    assert lean._FINDER not in sys.meta_path


def test_training_after_diffusers_was_imported(tmp_path):
    """diffusers imported before main() has already found bitsandbytes: main() must not block it (it used to, and
    diffusers then failed to import its models)."""
    pytest.importorskip("bitsandbytes")
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora", train={"max_train_steps": 1})
    code = f"import diffusers, sys, train_lora; sys.exit(train_lora.main(['--config', {str(cfg)!r}]))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_training_imports_bitsandbytes_only_for_an_8bit_optimizer(tmp_path):
    """One process, as users start it: a LoRA run with AdamW and a sample, then one with AdamW8bit."""
    pytest.importorskip("bitsandbytes")
    configs = {}
    for opt in ("AdamW", "AdamW8bit"):
        configs[opt] = write_config(
            tmp_path / f"{opt}.toml", tmp_path / opt, "lora", train={"max_train_steps": 2},
            optimizer={"optimizer_type": opt},
            sample={"prompts": ["a red circle --d 1 --s 2"]})  # sampled at the end
    code = textwrap.dedent(f"""
        import json, sys
        import train_lora
        ZOO = ("diffusers.models.transformers.auraflow", "diffusers.models.unets.unet_3d",
               "diffusers.models.autoencoders.autoencoder_dc", "diffusers.hooks.faster_cache")
        report = {{}}
        for opt, cfg in {json.dumps({k: str(v) for k, v in configs.items()})}.items():
            code = train_lora.main(["--config", cfg, "--save.save_state=false"])
            report[opt] = {{"exit": code, "bitsandbytes": sys.modules.get("bitsandbytes") is not None,
                           "inductor": "torch._inductor.compile_fx" in sys.modules,
                           "scipy": sys.modules.get("scipy") is not None,
                           "model_zoo": sorted(k for k in sys.modules if k.startswith(ZOO))}}
        print(json.dumps(report))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Neither bitsandbytes, nor TorchInductor, nor scipy, nor models of other kinds (the deferred package inits of
    # library/lean.py), even with a sample drawn through the diffusers pipeline.
    assert report["AdamW"] == {"exit": 0, "bitsandbytes": False, "inductor": False, "scipy": False, "model_zoo": []}
    assert report["AdamW8bit"]["exit"] == 0 and report["AdamW8bit"]["bitsandbytes"]
    assert (tmp_path / "AdamW" / "sample").is_dir()
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision" not in proc.stderr, proc.stderr[-2000:]


def test_deferred_package_gives_submodules_alone_and_forwards_to_a_replacing_init(tmp_path, monkeypatch):
    """`from pkg import sub` imports that file only; an __init__.py that puts another module in its place in
    sys.modules (transformers' _LazyModule) is forwarded to for every later name, through the first object too."""
    pkg = tmp_path / "lazypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import sys, types\nsys.lazypkg_inits += 1\nlazy = types.ModuleType(__name__)\n"
        "lazy.__path__ = __path__\nlazy.ONE, lazy.TWO = 1, 2\nsys.modules[__name__] = lazy\n")
    (pkg / "part.py").write_text("PART = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "lazypkg_inits", 0, raising=False)
    monkeypatch.setattr(lean, "UNUSED_AT_START", ())
    monkeypatch.setattr(lean, "DEFERRED_INITS", ("lazypkg",))
    monkeypatch.setattr(lean, "CHECKERS", ())
    for name in ("lazypkg", "lazypkg.part"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    lean.block_unused()
    try:
        first = importlib.import_module("lazypkg")
        from lazypkg import part

        assert part.PART == 3 and sys.lazypkg_inits == 0
        assert first.ONE == 1 and sys.lazypkg_inits == 1
        assert first.TWO == 2 and sys.lazypkg_inits == 1  # forwarded, not an AttributeError
    finally:
        lean.unblock_all()


def test_transformers_index_from_the_cache_is_transformers_own(tmp_path, monkeypatch):
    """The cached lazy index of transformers' models folder equals the one transformers computes, and a second
    process reads it from the cache without computing it."""
    from pathlib import Path

    import transformers.utils.import_utils as iu

    monkeypatch.setenv("SDTK_CACHE", str(tmp_path))
    models = Path(iu.__file__).parent.parent / "models"
    real = getattr(iu.define_import_structure, "__wrapped__", None) or iu.define_import_structure
    computed = real(models, prefix="models")
    stand_in = types.ModuleType("stand_in")
    stand_in.define_import_structure = real
    lean._cache_transformers_index(stand_in)
    assert stand_in.define_import_structure(models, prefix="models") == computed  # computed, then written
    assert len(list((tmp_path / "lean").glob("transformers-*.json"))) == 1

    def refuse(*a, **k):
        raise AssertionError("computed again")

    again = types.ModuleType("again")
    again.define_import_structure = refuse
    lean._cache_transformers_index(again)
    assert again.define_import_structure(models, prefix="models") == computed
    with pytest.raises(AssertionError):
        again.define_import_structure(models / "clip")  # other folders: transformers' own function


def test_transformers_index_falls_back_to_transformers_on_a_bad_cache_or_no_metadata(tmp_path, monkeypatch):
    """A cache file of another shape, or a transformers without installed metadata (a source checkout), gives
    transformers' own index instead of an error at import."""
    import importlib.metadata
    from pathlib import Path

    import transformers.utils.import_utils as iu

    monkeypatch.setenv("SDTK_CACHE", str(tmp_path))
    models = Path(iu.__file__).parent.parent / "models"
    real = getattr(iu.define_import_structure, "__wrapped__", None) or iu.define_import_structure
    computed = real(models, prefix="models")
    key = f"transformers-{importlib.metadata.version('transformers')}-{models.stat().st_mtime_ns}"
    (tmp_path / "lean").mkdir()
    (tmp_path / "lean" / f"{key}.json").write_text('["ab"]')  # valid JSON, not an index
    bad_cache = types.ModuleType("bad_cache")
    bad_cache.define_import_structure = real
    lean._cache_transformers_index(bad_cache)
    assert bad_cache.define_import_structure(models, prefix="models") == computed
    assert bad_cache.define_import_structure.__wrapped__ is real

    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    no_meta = types.ModuleType("no_meta")
    no_meta.define_import_structure = real
    lean._cache_transformers_index(no_meta)
    assert no_meta.define_import_structure(models, prefix="models") == computed


def test_packages_distributions_from_the_cache_is_the_standard_librarys(tmp_path, monkeypatch):
    """The cached answer equals importlib.metadata's; a second call reads it without computing; a changed sys.path
    folder or a cache file of another shape computes it again."""
    import importlib.metadata

    monkeypatch.setenv("SDTK_CACHE", str(tmp_path))
    real = lean._real_packages_distributions
    expected = real()
    calls = []

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(lean, "_real_packages_distributions", counted)
    assert lean._cached_packages_distributions() == expected and len(calls) == 1
    assert lean._cached_packages_distributions() == expected and len(calls) == 1  # from the file
    (tmp_path / "site").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert lean._cached_packages_distributions() == expected and len(calls) == 2
    (tmp_path / "site" / "new.dist-info").mkdir()  # an install changes its folder's modification time
    assert lean._cached_packages_distributions() == expected and len(calls) == 3
    from library.paths import REPO_ROOT

    monkeypatch.syspath_prepend(str(REPO_ROOT))  # the toolkit's folder (a script's sys.path[0]): not in the key
    assert lean._cached_packages_distributions() == expected and len(calls) == 3
    (tmp_path / "lean" / "packages_distributions.json").write_text('{"sys_path": 1}')
    assert lean._cached_packages_distributions() == expected and len(calls) == 4
    assert importlib.metadata.packages_distributions is real  # installed only by block_unused, at a fresh start


def test_collect_less_during_start_then_freeze_in_a_script_process_only(monkeypatch):
    """In a script process the start collects every START_GC_THRESHOLD allocations; start_done freezes what exists,
    puts the thresholds back and trims the heap; in-process (tests) nothing changes."""
    import gc

    before, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    trims = []
    monkeypatch.setattr(lean, "release_free_heap", lambda: trims.append(1) or True)
    lean.collect_less_during_start()
    lean.freeze_for_exit()
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen_before and not trims  # not a script

    monkeypatch.setattr(lean, "started_as_script", lambda: True)
    try:
        lean.collect_less_during_start()
        assert gc.get_threshold() == (lean.START_GC_THRESHOLD, *before[1:])
        lean.start_done()
        assert gc.get_threshold() == before and gc.get_freeze_count() > frozen_before and trims == [1]
        lean.start_done()  # once only
        assert trims == [1]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        lean._threshold_before_start = None


def test_a_script_process_frees_the_start_from_collections_and_writes_its_result(tmp_path):
    """`python train_lora.py` (run here through runpy, as the interpreter runs a script): by the first forward the
    collector is back at its thresholds and the start's objects are frozen, and the run's LoRA file is whole."""
    from safetensors.torch import load_file

    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora", train={"max_train_steps": 1})
    code = textwrap.dedent(f"""
        import gc, json, runpy, sys
        import torch
        before, at_first_forward = gc.get_threshold(), {{}}
        def first_forward(module, args):  # training has begun: the start is over
            if not at_first_forward:  # (get_freeze_count walks the frozen objects: once only)
                at_first_forward["state"] = [gc.get_threshold() == before, gc.get_freeze_count()]
        torch.nn.modules.module.register_module_forward_pre_hook(first_forward)
        sys.argv = ["train_lora.py", "--config", {str(cfg)!r}, "--save.save_state=false"]
        try:
            runpy.run_path("train_lora.py", run_name="__main__")
        except SystemExit as e:
            code = e.code
        print(json.dumps({{"exit": code, "same_thresholds": gc.get_threshold() == before,
                          "frozen": gc.get_freeze_count(), "at_first_forward": at_first_forward["state"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["exit"] == 0 and report["same_thresholds"] and report["frozen"] > 100_000, report
    same_thresholds, frozen = report["at_first_forward"]
    assert same_thresholds and frozen > 100_000, report  # set back and frozen when the model was loaded
    assert load_file(tmp_path / "out" / "run.safetensors")  # written whole, loadable
    plain = subprocess.run([sys.executable, "-c", "from library import lean; print(lean.started_as_script())"],
                           cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=60)
    assert plain.stdout.strip() == "False", plain.stderr


def test_release_free_heap_hands_free_pages_back():
    """30 MB freed inside the C heap (a live block after them keeps glibc from trimming the top) stays resident
    until release_free_heap; then the resident size drops by most of it. A C library without malloc_trim: False."""
    code = textwrap.dedent("""
        import sys
        from library import lean
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        blocks = [b"x" * 60_000 for _ in range(500)]  # above pymalloc's 512 bytes, below malloc's mmap threshold
        keep = b"y" * 60_000
        del blocks
        before = rss()
        ok = lean.release_free_heap()
        print(ok, before - rss())
    """)
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/statm")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    ok, dropped = proc.stdout.split()
    if ok == "False":
        pytest.skip("no malloc_trim in this C library")
    assert int(dropped) > 20_000_000, dropped
