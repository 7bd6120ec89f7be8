"""Every configs/*_merge.toml loads as a MergeRecipe; recipe checks name the key to fix."""

from pathlib import Path

import pytest

from library.config.core import dump_toml, load_config
from library.config.merge import MergeRecipe
from library.errors import ConfigError
from library.merge.blocks import parse_block_alphas

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*_merge.toml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert "quickstart_merge.toml" in names and len(names) >= 7


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_round_trips(path):
    cfg = load_config(MergeRecipe, path)
    assert load_config(MergeRecipe, __import__("tomllib").loads(dump_toml(cfg))) == cfg
    family = "sdxl" if "sdxl" in path.name else "sd3" if path.name.startswith("sd3") else "sd1"
    # SD3's slots follow its joint blocks: 24 for SD3 / SD3.5 Medium, 38 for SD3.5 Large.
    n = (38 if path.name.startswith("sd35l") else 24) if family == "sd3" else None
    parse_block_alphas(cfg.merge.block_alphas, family, cfg.merge.alpha, what="merge.block_alphas", n_blocks=n)
    parse_block_alphas(cfg.merge.block_betas, family, cfg.merge.beta, what="merge.block_betas", n_blocks=n)
    for entry in cfg.lora:
        parse_block_alphas(entry.block_weights, family, 1.0, what="lora.block_weights", n_blocks=n)


@pytest.mark.parametrize("tables,message", [
    ({"merge": {"mode": "add_difference", "model_a": "a", "model_b": "b"}}, "needs merge.model_c"),
    ({"merge": {"mode": "ties", "model_a": "a"}}, "needs merge.models"),
    ({"merge": {"mode": "ties", "model_a": "a", "models": ["b"], "weights": [1, 2]}}, "one per model"),
    ({"merge": {"mode": "dare", "model_a": "a", "models": ["b"], "density": 0}}, "merge.density"),
    ({"merge": {"mode": "lora_merge", "model_a": "a"}}, r"\[\[lora\]\]"),
    ({"merge": {"mode": "lora_resize"}}, "extract.lora"),
    ({"merge": {"mode": "lora_extract", "model_a": "a", "model_b": "b"}, "output": {"path": "out"}}, ".safetensors"),
    ({"merge": {"model_a": "a", "model_b": "b"}, "output": {"format": "single_file", "path": "x"}}, "output.format"),
    ({"merge": {"model_a": "a", "model_b": "b"}, "extract": {"clamp_quantile": 0}}, "extract.clamp_quantile"),
])
def test_recipe_checks(tables, message):
    with pytest.raises(ConfigError, match=message):
        load_config(MergeRecipe, tables)
