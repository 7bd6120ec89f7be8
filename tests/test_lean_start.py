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
