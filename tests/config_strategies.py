"""Hypothesis strategies shared by the config fuzz tests (tests/test_config_fuzz.py: a stand-in schema;
tests/test_config_scripts.py: every script's real config)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from hypothesis import strategies as st

from library.config.schema import field_types

text = st.text(max_size=12)
leaf = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), text, st.booleans(),
    st.dates(), st.datetimes(), st.times(),
)


def toml_values(key: st.SearchStrategy) -> st.SearchStrategy:
    """Any TOML value: leaves, arrays and tables (with keys drawn from `key`), nested."""
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(key, inner, max_size=4),
                        max_leaves=8)


def random_table(draw, node: dict) -> dict:
    """A table drawn by walking down from `node` at random (into sub-tables and arrays of tables)."""
    while True:
        tables = [v for v in node.values() if isinstance(v, dict)]
        tables += [x for v in node.values() if isinstance(v, list) for x in v if isinstance(x, dict)]
        if not tables or draw(st.booleans()):
            return node
        node = draw(st.sampled_from(tables))


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
