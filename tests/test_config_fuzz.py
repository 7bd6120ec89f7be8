"""Property tests of the config loader and command line: any input loads or raises ConfigError, never anything else;
any valid config survives dump_toml -> load unchanged."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from library.config.core import config_hash, dump_toml, iter_options, load_config, parse_cli, to_dict
from library.config.fields import opt
from library.config.schema import Option, build, field_types, non_none
from library.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# A schema shaped like the real run config: tables, a list of tables inside a table, every supported field type.
@dataclass
class Subset:
    image_dir: str = opt("", "Folder of images.")
    num_repeats: int = opt(1, "Repeats per epoch.")
    keep_tokens: int = opt(0, "Leading tags never shuffled.")
    caption_dropout_rate: float = opt(0.0, "Probability of an empty caption.")
    protected_tags: list[str] = opt([], "Tags never dropped.")


@dataclass
class Data:
    resolution: int | list[int] = opt(512, "Side, or [width, height].")
    batch_size: int = opt(1, "Images per batch.")
    bucket_steps: tuple[int, int] = opt((64, 64), "Bucket size steps.")
    subsets: list[Subset] = opt([], "Image folders.")
    synonyms: dict[str, list[str]] = opt({}, "Tag -> replacements.")


@dataclass
class Model:
    pretrained_model_name_or_path: str = opt("tiny:sd15", "Base model.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = opt("auto", "What the UNet predicts.")
    clip_skip: int = opt(1, "Text-encoder layer from the end.")


@dataclass
class Optim:
    optimizer_type: Literal["adamw", "adamw8bit", "lion", "prodigy"] = opt("adamw", "Optimizer.")
    learning_rate: float = opt(1e-4, "Peak learning rate.")
    text_encoder_lr: Optional[float] = opt(None, "Text-encoder learning rate (unset: learning_rate).")
    betas: tuple[float, float] = opt((0.9, 0.999), "Adam betas.")
    optimizer_args: dict[str, Any] = opt({}, "Extra optimizer keyword arguments.")


@dataclass
class Noise:
    offset: float = opt(0.0, "Offset noise.")
    zero_terminal_snr: bool = opt(False, "Zero terminal SNR.")

    def validate(self) -> None:
        if not 0.0 <= self.offset <= 1.0:
            raise ConfigError(f"noise.offset must be in [0, 1], got {self.offset}")


@dataclass
class Train:
    seed: int = opt(42, "Seed.")
    max_train_steps: int = opt(1000, "Steps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = opt("no", "Precision.")
    gradient_checkpointing: bool = opt(False, "Recompute activations.")


@dataclass
class Root:
    model: Model = opt(Model(), "Base model.")
    data: Data = opt(Data(), "Dataset.")
    optimizer: Optim = opt(Optim(), "Optimizer.")
    noise: Noise = opt(Noise(), "Noise.")
    train: Train = opt(Train(), "Training.")
    sample: Optional[Subset] = opt(None, "An optional table.")

    def validate(self) -> None:
        if self.noise.zero_terminal_snr and self.model.prediction_type != "v_prediction":
            raise ConfigError("noise.zero_terminal_snr = true needs model.prediction_type = 'v_prediction'")


ALIASES = {"learning_rate": "optimizer.learning_rate", "seed": "train.seed", "resolution": "data.resolution",
           "optimizer_args": "optimizer.optimizer_args"}
KEYS = [o.path for o in iter_options(Root) if isinstance(o, Option)]
NAMES = sorted({p for k in KEYS for p in k.split(".")})

# ---------------------------------------------------------------------------------------------------------------- TOML

text = st.text(max_size=12)
key = st.one_of(st.sampled_from(NAMES), text)
leaf = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), text, st.booleans(),
    st.dates(), st.datetimes(), st.times(),
)
toml_value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(key, inner, max_size=4),
                          max_leaves=8)


def _loads_or_config_error(data: Any) -> None:
    try:
        cfg = load_config(Root, data, source="fuzz.toml")
    except ConfigError as e:
        assert str(e).startswith("fuzz.toml: ")
    else:
        assert isinstance(cfg, Root)


@FUZZ
@given(st.dictionaries(key, toml_value, max_size=6))
def test_random_documents_load_or_raise_config_error(data):
    _loads_or_config_error(data)


def _random_table(draw, node: dict) -> dict:
    """A table drawn by walking down from `node` at random (into sub-tables and arrays of tables)."""
    while True:
        tables = [v for v in node.values() if isinstance(v, dict)]
        tables += [x for v in node.values() if isinstance(v, list) for x in v if isinstance(x, dict)]
        if not tables or draw(st.booleans()):
            return node
        node = draw(st.sampled_from(tables))


@st.composite
def mutated_defaults(draw) -> dict:
    """The default config as TOML, with a few random edits deep inside: wrong types, unknown keys, new tables."""
    data = to_dict(Root())
    data["data"]["subsets"] = [to_dict(Subset()) for _ in range(draw(st.integers(0, 2)))]
    for _ in range(draw(st.integers(1, 4))):
        node = _random_table(draw, data)
        name = draw(st.sampled_from(sorted(node)) if node and draw(st.booleans()) else key)
        node[name] = draw(toml_value)
    return data


@FUZZ
@given(mutated_defaults())
def test_mutated_configs_load_or_raise_config_error(data):
    _loads_or_config_error(data)


def valid_values(tp: Any) -> st.SearchStrategy:
    """Values of a config field type (as the loader builds them); None is left to the caller."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return st.builds(tp, **{n: valid_values(t) for n, t in field_types(tp).items()})
    if tp is int:
        return st.integers(min_value=-(2**63), max_value=2**63 - 1)
    if tp is float:
        return st.floats(allow_nan=False)
    if tp is str:
        return st.text(max_size=10)
    if tp is bool:
        return st.booleans()
    if tp is Any:
        return st.recursive(st.integers() | st.text(max_size=5) | st.booleans() | st.floats(allow_nan=False),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                            max_leaves=6)
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(valid_values(args[0]), max_size=3)
    if origin is tuple:
        return st.tuples(*(valid_values(a) for a in args))
    if origin is dict:
        return st.dictionaries(text, valid_values(args[1]), max_size=3)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(valid_values(a) for a in args if a is not type(None)))
    raise AssertionError(f"no strategy for {tp}")


def _optional_fields_none_or_value(cls: type) -> st.SearchStrategy:
    """Like valid_values, but Optional fields (all default None here) may also stay None."""
    fields = {}
    for name, tp in field_types(cls).items():
        inner = non_none(tp)
        strategy = _optional_fields_none_or_value(inner) if dataclasses.is_dataclass(inner) else valid_values(tp)
        if inner is not tp:
            strategy = st.none() | strategy
        fields[name] = strategy
    return st.builds(cls, **fields)


@FUZZ
@given(_optional_fields_none_or_value(Root))
def test_dump_toml_round_trips_any_valid_config(cfg):
    text = dump_toml(cfg)
    again = build(Root, tomllib.loads(text), source="dump")  # build: validate() may reject a random config
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert build(Root, tomllib.loads(dump_toml(cfg, comments=False)), source="dump") == cfg


# ---------------------------------------------------------------------------------------------------------------- CLI

flag_names = st.sampled_from(KEYS + list(ALIASES) + ["print-config", "dry_run", "config", "extra_flag"]) | text
cli_text = st.text(st.characters(blacklist_categories=["Cs"]) | st.sampled_from(["\udcff", "=", "-", ".", "[", '"']),
                   max_size=10)
token = st.one_of(
    st.builds(lambda n, v: f"--{n}={v}", flag_names, cli_text),
    st.builds(lambda n: f"--{n}", flag_names),
    st.builds(lambda v: str(v), toml_value.filter(lambda v: not isinstance(v, dict))),
    cli_text,
    st.sampled_from(["true", "false", "--", "-", "--config=/nonexistent/x.toml", "1e-4", "[1, 2]"]),
).filter(lambda t: t not in ("-h", "--help"))


@FUZZ
@given(st.lists(token, max_size=6))
def test_random_argv_parses_or_raises_config_error(argv):
    try:
        cfg, flags = parse_cli(Root, argv, aliases=ALIASES, prog="fuzz.py", description="Fuzz.",
                               extra_flags={"extra_flag": "An extra flag."})
    except ConfigError:
        return
    assert isinstance(cfg, Root) and set(flags.extra) == {"extra_flag"}


@FUZZ
@given(st.sampled_from(KEYS), cli_text)
def test_any_value_for_a_valid_key_is_typed_or_rejected(name, value):
    try:
        cfg, _ = parse_cli(Root, [f"--{name}={value}"], aliases=ALIASES, prog="fuzz.py", description="Fuzz.")
    except ConfigError as e:
        assert f"--{name}" in str(e) or str(e).startswith("command line: ")  # the flag, or a validate() rule
        return
    *tables, leaf_name = name.split(".")
    parent = cfg
    for part in tables:
        parent = getattr(parent, part)
    assert _fits(getattr(parent, leaf_name), field_types(type(parent))[leaf_name])


def _fits(value: Any, tp: Any) -> bool:
    """The value has the declared Python type (float fields hold floats, tuples stay tuples, ...)."""
    tp = non_none(tp)
    origin = typing.get_origin(tp)
    if tp in (int, float, str, bool):
        return type(value) is tp
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return type(value) is origin
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    raise AssertionError(f"no check for {tp}")


def test_the_fuzz_schema_covers_every_field_kind():
    kinds = {typing.get_origin(o.type) or o.type for o in iter_options(Root) if isinstance(o, Option)}
    assert {int, float, str, bool, Literal, list, tuple, dict, types.UnionType, typing.Union} <= kinds


# ------------------------------------------------------------------------------------------- the real scripts' configs
# The tests above use a stand-in schema; these run the real root configs of every script, through their main() (the
# exit code and the one `error:` line a user sees) and, for two cases, through the shell.

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import tomli_w  # noqa: E402

import merge_models  # noqa: E402
import train_dreambooth  # noqa: E402
import train_hypernetwork  # noqa: E402
import train_lora  # noqa: E402
import train_native  # noqa: E402
import train_textual_inversion  # noqa: E402

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
        node = _random_table(draw, data)
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
