"""Test tiers (issue 16): every test module has exactly one tier in tests/conftest.py's TIER_OF_MODULE, the tiers are
registered markers, `-m <tier>` selects a module by its tier, and a module without a tier stops collection."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from tests.conftest import TIER_OF_MODULE, TIERS

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_every_test_module_has_one_tier_and_every_entry_a_module():
    on_disk = {p.name for p in TESTS.glob("test_*.py")}
    assert sorted(on_disk - TIER_OF_MODULE.keys()) == [], "add these to TIER_OF_MODULE in tests/conftest.py"
    assert sorted(TIER_OF_MODULE.keys() - on_disk) == [], "remove these from TIER_OF_MODULE: no such test module"
    assert set(TIER_OF_MODULE.values()) == set(TIERS)


def test_tiers_are_registered_markers():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert sorted(m.split(":")[0] for m in markers if m.split(":")[0] in TIERS) == sorted(TIERS)


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _sandbox(tmp_path: Path, modules: dict[str, str]) -> Path:
    """This conftest and pyproject.toml with the given test modules (name -> source) in a folder of their own."""
    (tmp_path / "tests").mkdir()
    shutil.copy(TESTS / "conftest.py", tmp_path / "tests" / "conftest.py")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for name, text in modules.items():
        (tmp_path / "tests" / name).write_text(text)
    return tmp_path


def test_a_tier_selects_its_modules_only(tmp_path):
    unit = next(name for name, tier in TIER_OF_MODULE.items() if tier == "unit")
    e2e = next(name for name, tier in TIER_OF_MODULE.items() if tier == "e2e")
    root = _sandbox(tmp_path, {unit: "def test_u():\n    pass\n", e2e: "def test_e():\n    pass\n"})
    out = _pytest(root, "--collect-only", "-m", "unit")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"tests/{unit}::test_u" in out.stdout and "test_e" not in out.stdout
    out = _pytest(root, "--collect-only", "-m", "e2e or acceptance")
    assert f"tests/{e2e}::test_e" in out.stdout and "test_u" not in out.stdout


def test_a_module_without_a_tier_stops_collection_naming_it(tmp_path):
    root = _sandbox(tmp_path, {"test_not_in_the_table.py": "def test_x():\n    pass\n"})
    out = _pytest(root)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "test_not_in_the_table.py has no tier: add it to TIER_OF_MODULE in tests/conftest.py" in out.stdout


def test_the_shared_model_check_sees_each_kind_of_change():
    """What the session-end check of tiny_models compares: a copy matches, and each change a test could make
    (a weight, requires_grad, an added module, a token, `extra`) does not. On a stand-in with the model's fields."""
    import copy
    from types import SimpleNamespace

    import torch

    from tests.conftest import _fingerprint

    torch.manual_seed(0)
    shared = SimpleNamespace(family="sd1", prediction_type="epsilon", extra={"tiny": "sd15"},
                             unet=torch.nn.Conv2d(4, 4, 3), vae=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)),
                             text_encoders=[torch.nn.Embedding(10, 8).requires_grad_(False)], tokenizers=[list("abc")])
    assert _fingerprint(copy.deepcopy(shared)) == _fingerprint(shared)
    changes = [
        lambda m: m.unet.weight.data.add_(1e-3),
        lambda m: m.text_encoders[0].requires_grad_(True),
        lambda m: m.vae.add_module("extra_layer", torch.nn.Identity()),
        lambda m: m.tokenizers[0].append("<sks>"),
        lambda m: m.extra.update(note="x"),
        lambda m: m.unet.to(torch.float16),
    ]
    for change in changes:
        model = copy.deepcopy(shared)
        change(model)
        assert _fingerprint(model) != _fingerprint(shared)
