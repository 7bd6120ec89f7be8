"""The real root configs of every script, fuzzed through their main() (the exit code and the one `error:` line a
user sees) and, for two cases, through the shell; plus wrong table types and every two-key validate() rule.
tests/test_config_fuzz.py does the same on a stand-in schema."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import merge_models
import train_dreambooth
import train_hypernetwork
import train_lora
import train_native
import train_textual_inversion
from library.config.core import dump_toml, iter_options, load_config, to_dict
from library.config.schema import Option
from tests.config_strategies import leaf, random_table, text, toml_values, valid_values

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

toml_value = toml_values(text)

SCRIPTS = {"train_native": train_native, "train_lora": train_lora, "train_textual_inversion": train_textual_inversion,
           "train_hypernetwork": train_hypernetwork, "train_dreambooth": train_dreambooth, "merge_models": merge_models}
ROOT = Path(__file__).resolve().parent.parent


def _main_result(script: str, doc: dict, folder: Path, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `<script> --config <doc as TOML> --print-config` run in-process."""
    path = folder / "fuzz.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    capsys.readouterr()
    rc = SCRIPTS[script].main(["--config", str(path), "--print-config"])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_clean_outcome(rc: int, out: str, err: str, script: str, path: Path) -> None:
    """Accepted: exit 0 and a printed config that loads back to the same config. Rejected: exit 2 and exactly one
    `error: <file>: ...` line (never a traceback)."""
    assert "Traceback" not in err
    if rc == 0:
        cls = SCRIPTS[script].CONFIG_CLASS
        again = load_config(cls, tomllib.loads(out), source="printed")
        assert dump_toml(again) == out
        return
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), err


def _real_defaults(script: str) -> dict:
    data = to_dict(SCRIPTS[script].CONFIG_CLASS())
    if script == "merge_models":
        data["merge"].update(model_a="tiny:sd15", model_b="tiny:sd15:seed=1")
    else:
        data["model"]["pretrained_model_name_or_path"] = "tiny:sd15"
    if script == "train_dreambooth":
        data["dreambooth"]["concepts"] = [{"instance_dir": "demo:red", "identifier": "sks", "class_word": "dog"}]
    return data


def _toml_ready(value: Any) -> Any:
    """A value from valid_values() as TOML data (dataclass -> table, tuple -> array)."""
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_toml_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items()}
    return value


@st.composite
def real_mutated(draw) -> tuple[str, dict]:
    """A real script's default config with a few random edits: a well-typed random value for a real option (which
    exercises the validate() rules and gives accepted configs too), a wrongly typed value, an unknown key at a random
    depth, or a table replaced by a scalar / array / array of tables."""
    script = draw(st.sampled_from(sorted(SCRIPTS)))
    cls = SCRIPTS[script].CONFIG_CLASS
    data = _real_defaults(script)
    options = [o for o in iter_options(cls) if isinstance(o, Option)]
    names = sorted({p for o in options for p in o.path.split(".")})
    real_key = st.one_of(st.sampled_from(names), text)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["valid"] * 4 + ["retype", "unknown", "table"]))
        if kind in ("valid", "retype"):
            o = draw(st.sampled_from(options))
            *tables, leaf_name = o.path.split(".")
            node = data
            for t in tables:
                node = node.setdefault(t, {}) if isinstance(node.get(t, {}), dict) else node
            value = valid_values(o.type) if kind == "valid" else toml_value
            node[leaf_name] = _toml_ready(draw(value))
            continue
        node = random_table(draw, data)
        if kind == "unknown":
            node[draw(real_key)] = draw(toml_value)
        else:
            table_names = [k for k, v in node.items() if isinstance(v, dict)] or sorted(node) or ["model"]
            node[draw(st.sampled_from(table_names))] = draw(
                st.one_of(leaf, st.lists(leaf, max_size=2),
                          st.lists(st.dictionaries(real_key, leaf, max_size=2), min_size=1, max_size=2)))
    return script, data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(real_mutated())
def test_real_script_configs_fuzzed_through_main_exit_0_or_2(tmp_path, capsys, case):
    script, doc = case
    rc, out, err = _main_result(script, doc, tmp_path, capsys)
    _assert_clean_outcome(rc, out, err, script, tmp_path / "fuzz.toml")


# Wrong table types: a table given as a scalar, an array of tables, a value given as a table. One error naming the key.
WRONG_TABLES = [
    ("train_lora", {"model": "tiny:sd15"}, "key 'model' at the top level must be a table, got string"),
    ("train_lora", {"data": [{"batch_size": 2}]}, "key 'data' at the top level must be a table, got array"),
    ("train_lora", {"network": 3}, "key 'network' at the top level must be a table, got integer"),
    ("train_lora", {"data": {"resolution": {"w": 64}}}, "key 'resolution' in [data] must be int | list[int], got table"),
    ("train_lora", {"train": {"deepspeed": "zero2"}}, "key 'deepspeed' in [train] must be a table, got string"),
    ("train_dreambooth", {"dreambooth": {"concepts": {"instance_dir": "demo:red"}}},
     "key 'concepts' in [dreambooth] must be list[table], got table"),
    ("train_dreambooth", {"dreambooth": {"concepts": [{"instance_dir": "demo:red", "identifier": {"a": 1}}]}},
     "key 'identifier' in [dreambooth.concepts[0]] must be str, got table"),
    ("merge_models", {"lora": {"path": "x.safetensors"}}, "key 'lora' at the top level must be list[table], got table"),
    ("merge_models", {"merge": {"models": "a.safetensors"}}, "key 'models' in [merge] must be list[str], got string"),
    ("train_hypernetwork", {"hypernetwork": {"layer_structure": {"1": 2}}},
     "key 'layer_structure' in [hypernetwork] must be list[float], got table"),
]


@pytest.mark.parametrize("script,doc,key", WRONG_TABLES)
def test_wrong_table_types_are_one_clear_error(tmp_path, capsys, script, doc, key):
    rc, out, err = _main_result(script, doc, tmp_path, capsys)
    _assert_clean_outcome(rc, out, err, script, tmp_path / "fuzz.toml")
    assert rc == 2 and key in err, err


# Every rule that relates two options (validate() of a table or of a root config), with both keys it must name.
CONFLICTS = [
    ("train_lora", {"model": {"v_parameterization": True, "prediction_type": "epsilon"}},
     ["model.v_parameterization", "model.prediction_type"]),
    ("train_lora", {"model": {"prediction_type": "epsilon"}, "noise": {"zero_terminal_snr": True}},
     ["noise.zero_terminal_snr", "model.prediction_type"]),
    ("train_lora", {"noise": {"adaptive_offset": 0.1}}, ["noise.adaptive_offset", "noise.offset"]),
    ("train_lora", {"noise": {"min_timestep": 500, "max_timestep": 400}}, ["noise.min_timestep", "noise.max_timestep"]),
    ("train_lora", {"loss": {"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 2.0}},
     ["loss.huber_c", "loss.huber_schedule"]),
    ("train_lora", {"scheduler": {"warmup_steps": 10, "warmup_ratio": 0.1}},
     ["scheduler.warmup_steps", "scheduler.warmup_ratio"]),
    ("train_lora", {"scheduler": {"scheduler_type": "constant", "warmup_steps": 10}},
     ["scheduler.scheduler_type", "scheduler.warmup_steps"]),
    ("train_lora", {"scheduler": {"scheduler_type": "cosine", "min_lr_ratio": 0.1}},
     ["scheduler.min_lr_ratio", "scheduler.scheduler_type"]),
    ("train_lora", {"data": {"cache_latents": True, "random_crop": True}}, ["data.random_crop", "data.cache_latents"]),
    ("train_lora", {"data": {"cache_latents_to_disk": True}}, ["data.cache_latents_to_disk", "data.cache_latents"]),
    ("train_lora", {"data": {"cache_text_encoder_outputs": True, "shuffle_caption": True}},
     ["data.cache_text_encoder_outputs", "data.shuffle_caption"]),
    ("train_lora", {"data": {"bucket_reso_steps": 128, "min_bucket_reso": 320}},
     ["data.min_bucket_reso", "data.bucket_reso_steps"]),
    ("train_lora", {"network": {"target": "attn+conv"}}, ["network.target", "network.conv_dim"]),
    ("train_lora", {"network": {"network_module": "locon"}}, ["network.network_module", "network.conv_dim"]),
    ("train_lora", {"network": {"train_unet_only": True, "train_text_encoder_only": True}},
     ["network.train_unet_only", "network.train_text_encoder_only"]),
    ("train_lora", {"network": {"rank_dropout": 0.1}}, ["network.rank_dropout", "network.network_module"]),
    ("train_lora", {"network": {"network_module": "loha", "network_dropout": 0.1}},
     ["network.network_dropout", "network.network_module"]),
    ("train_lora", {"network": {"block_alphas": [1.0] * 25}}, ["network.block_alphas", "network.block_dims"]),
    ("train_lora", {"network": {"conv_block_alphas": [1.0] * 25}},
     ["network.conv_block_alphas", "network.conv_block_dims"]),
    ("train_lora", {"network": {"network_module": "loha", "loraplus_lr_ratio": 16.0}},
     ["network.loraplus_lr_ratio", "network.network_module"]),
    ("train_lora", {"network": {"network_module": "dora", "scale_weight_norms": 1.0}},
     ["network.scale_weight_norms", "network.network_module"]),
    ("train_lora", {"train": {"deepspeed": {"offload_optimizer": "cpu"}}},
     ["train.deepspeed.offload_optimizer", "train.deepspeed.zero_stage"]),
    ("train_lora", {"train": {"deepspeed": {"zero_stage": 2, "offload_param": "cpu"}}},
     ["train.deepspeed.offload_param", "train.deepspeed.zero_stage"]),
    ("train_native", {"train": {"train_text_encoder": True, "deepspeed": {"zero_stage": 2}}},
     ["train.train_text_encoder", "train.deepspeed"]),
    ("train_lora", {"train": {"resume": "auto", "deepspeed": {"zero_stage": 2}}}, ["train.resume", "train.deepspeed"]),
    ("train_native", {"train": {"ema": True, "deepspeed": {"zero_stage": 3}}},
     ["train.ema", "train.deepspeed.zero_stage"]),
    ("train_hypernetwork", {"hypernetwork": {"dropout_structure": [0, 0.3, 0], "use_dropout": False}},
     ["hypernetwork.dropout_structure", "hypernetwork.use_dropout"]),
    ("train_textual_inversion", {"embedding": {"token_string": "<t>", "init_word": "", "init_from": ""}},
     ["embedding.init_word", "embedding.init_from"]),
    ("train_textual_inversion", {"embedding": {"token_string": "<t>", "replace_word": "a <t>"}},
     ["embedding.replace_word", "embedding.token_string"]),
    ("train_textual_inversion", {"embedding": {"token_string": "<t>", "replace_word": "cat", "captions": "style"}},
     ["embedding.replace_word", "embedding.captions"]),
    ("train_dreambooth", {"data": {"train_data_dir": "demo:red"},
                          "dreambooth": {"concepts": [{"instance_dir": "demo:red"}]}},
     ["data.train_data_dir", "dreambooth.concepts"]),
    ("train_dreambooth", {"data": {"dataset_config": "d.toml"},
                          "dreambooth": {"concepts": [{"instance_dir": "demo:red"}]}},
     ["data.dataset_config", "dreambooth.concepts"]),
    ("train_dreambooth", {"data": {"dataset_config": "d.toml"}, "dreambooth": {"prior_mode": "paired"}},
     ["dreambooth.prior_mode", "data.dataset_config"]),
    ("train_dreambooth", {"data": {"prior_loss_weight": 0.5}, "dreambooth": {
        "prior_loss_weight": 2.0, "concepts": [{"instance_dir": "demo:red"}]}},
     ["data.prior_loss_weight", "dreambooth.prior_loss_weight"]),
    ("train_dreambooth", {"data": {"enable_bucket": True}, "dreambooth": {
        "prior_mode": "paired", "prior_preservation": True, "concepts": [{"instance_dir": "demo:red"}]}},
     ["dreambooth.prior_mode", "data.enable_bucket"]),
    ("train_dreambooth", {"train": {"train_text_encoder": True}, "dreambooth": {
        "mode": "lora", "concepts": [{"instance_dir": "demo:red"}]}},
     ["train.train_text_encoder", "dreambooth.mode"]),
    ("merge_models", {"merge": {"mode": "add_difference", "model_a": "a", "model_b": "b"}},
     ["merge.mode", "merge.model_c"]),
    ("merge_models", {"merge": {"mode": "ties", "model_a": "a", "models": ["b", "c"], "weights": [1.0]}},
     ["merge.weights", "merge.models"]),
    ("merge_models", {"merge": {"model_a": "a", "model_b": "b"}, "output": {"format": "single_file", "path": "out"}},
     ["output.format", "output.path"]),
    ("merge_models", {"merge": {"mode": "lora_merge", "model_a": "a"}}, ["merge.mode", "[[lora]]"]),
    ("merge_models", {"merge": {"mode": "lora_resize"}}, ["merge.mode", "extract.lora"]),
    ("merge_models", {"merge": {"mode": "lora_extract", "model_a": "a", "model_b": "b"},
                      "output": {"path": "out/lora.safetensors", "format": "diffusers"}},
     ["merge.mode", "output.path"]),
]


@pytest.mark.parametrize("script,doc,keys", CONFLICTS, ids=[f"{c[0]}:{'+'.join(c[2])}" for c in CONFLICTS])
def test_conflicting_options_are_rejected_naming_both_keys(tmp_path, capsys, script, doc, keys):
    rc, out, err = _main_result(script, doc, tmp_path, capsys)
    _assert_clean_outcome(rc, out, err, script, tmp_path / "fuzz.toml")
    assert rc == 2, out
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    for key in keys:
        assert key in line, f"{key} not named in: {line}"


@pytest.mark.parametrize("script,doc,needle", [
    ("train_lora.py", {"network": {"train_unet_only": True, "train_text_encoder_only": True}},
     "network.train_unet_only and network.train_text_encoder_only"),
    ("merge_models.py", {"merge": {"mode": "lora_merge", "model_a": "a"}, "output": {"pathh": "x"}}, "pathh"),
])
def test_bad_config_through_the_shell_exits_2_with_one_line(tmp_path, script, doc, needle):
    path = tmp_path / "bad.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    proc = subprocess.run([sys.executable, str(ROOT / script), "--config", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and needle in lines[0], proc.stderr
