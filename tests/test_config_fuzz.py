"""Property tests of the config loader and command line on a stand-in schema shaped like the real run config: any
input loads or raises ConfigError, never anything else; any valid config survives dump_toml -> load unchanged.
tests/test_config_scripts.py runs the real scripts' configs the same way."""

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
from tests.config_strategies import random_table, text, toml_values, valid_values

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

key = st.one_of(st.sampled_from(NAMES), text)
toml_value = toml_values(key)


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


@st.composite
def mutated_defaults(draw) -> dict:
    """The default config as TOML, with a few random edits deep inside: wrong types, unknown keys, new tables."""
    data = to_dict(Root())
    data["data"]["subsets"] = [to_dict(Subset()) for _ in range(draw(st.integers(0, 2)))]
    for _ in range(draw(st.integers(1, 4))):
        node = random_table(draw, data)
        name = draw(st.sampled_from(sorted(node)) if node and draw(st.booleans()) else key)
        node[name] = draw(toml_value)
    return data


@FUZZ
@given(mutated_defaults())
def test_mutated_configs_load_or_raise_config_error(data):
    _loads_or_config_error(data)


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
