"""A script's start imports no optional package it does not use (library/lean.py), and prints no warnings about
packages it does not need (the pipeline's image processors, library/training/sample.py)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import textwrap

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
        report = {{}}
        for opt, cfg in {json.dumps({k: str(v) for k, v in configs.items()})}.items():
            code = train_lora.main(["--config", cfg, "--save.save_state=false"])
            report[opt] = {{"exit": code, "bitsandbytes": sys.modules.get("bitsandbytes") is not None,
                           "inductor": "torch._inductor.compile_fx" in sys.modules}}
        print(json.dumps(report))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["AdamW"] == {"exit": 0, "bitsandbytes": False, "inductor": False}
    assert report["AdamW8bit"]["exit"] == 0 and report["AdamW8bit"]["bitsandbytes"]
    assert (tmp_path / "AdamW" / "sample").is_dir()
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision" not in proc.stderr, proc.stderr[-2000:]
