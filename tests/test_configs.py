"""Every file in configs/ loads with the root config of the script it is written for (strictly, with validation)."""

import importlib
import sys
from pathlib import Path

import pytest

from library.config.core import load_config
from library.config.schema import to_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))

# File-name convention: <anything>_<method>.toml; quickstart.toml is the LoRA quickstart (the README's main job).
SCRIPT_BY_SUFFIX = {
    "native": "train_native",
    "lora": "train_lora",
    "dreambooth": "train_dreambooth",
    "textual_inversion": "train_textual_inversion",
    "hypernetwork": "train_hypernetwork",
    "merge": "merge_models",
}


def script_for(path: Path) -> str:
    if path.name == "quickstart.toml":
        return "train_lora"
    if path.stem.startswith("caption_"):  # caption_<captioner>.toml: caption_images.py
        return "caption_images"
    for suffix, script in SCRIPT_BY_SUFFIX.items():
        if path.stem.endswith("_" + suffix) or path.stem == suffix:
            return script
    if path.stem.endswith("_dataset"):
        return "dataset"
    raise AssertionError(f"{path.name}: name it <name>_<method>.toml so a test knows which script reads it")


def test_there_are_configs():
    assert any(p.name == "quickstart_native.toml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    script = script_for(path)
    if script == "dataset":
        from library.config.dataset_file import load_dataset_file

        load_dataset_file(path)
        return
    module = importlib.import_module(script)
    cfg = load_config(module.CONFIG_CLASS, path)
    assert isinstance(cfg, module.CONFIG_CLASS)
    # Every value written in the file is the value the script runs with (none dropped or replaced by a default).
    _assert_contains(to_dict(cfg), tomllib.loads(path.read_text(encoding="utf-8")), path.name)


def _assert_contains(loaded, written, where: str) -> None:
    if isinstance(written, dict):
        assert isinstance(loaded, dict), where
        for key, value in written.items():
            assert key in loaded, f"{where}.{key} is not in the loaded config"
            _assert_contains(loaded[key], value, f"{where}.{key}")
    elif isinstance(written, list):
        assert isinstance(loaded, list) and len(loaded) == len(written), where
        for i, (a, b) in enumerate(zip(loaded, written)):
            _assert_contains(a, b, f"{where}[{i}]")
    else:
        assert loaded == written and type(loaded) in (type(written), float), (where, loaded, written)
