"""Config schema machinery: which field types a config dataclass may use, how a parsed TOML value is checked
against them (with messages that name the table, key, expected type and value), and the tree walks shared by the
loader (`library.config.core`) and the command line (`library.config.cli`).

Supported field types: int (never bool), float (accepts int), str (paths stay str), bool, Literal[...], Optional[X]
(None is spelt by leaving the key out: TOML has no null), list[X], tuple[X, Y] / tuple[X, ...] (TOML arrays),
dict[str, X], Any, other unions (the first member that accepts the value wins), nested dataclass tables, and lists of
dataclasses (TOML `[[array of tables]]`). A field of any other type is a programming error (TypeError).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Union

import tomli_w

from library.config.fields import help_of
from library.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class TypeMismatch(Exception):
    """A value does not fit a type; turned into a ConfigError by the caller, which knows the file."""

    def __init__(self, path: tuple, expected: str, value: Any, hint: str = "") -> None:
        super().__init__(expected)
        self.path, self.expected, self.value, self.hint = path, expected, value, hint


# ----------------------------------------------------------------------------------------------------------------
# Types


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _strip(tp: Any) -> Any:
    """Annotated[X, ...] -> X."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def non_none(tp: Any) -> Any:
    """Optional[X] -> X; any other type unchanged."""
    tp = _strip(tp)
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _strip(args[0])
    return tp


def is_table_type(tp: Any) -> bool:
    """A nested `[table]` (a dataclass, or an Optional dataclass)."""
    tp = non_none(tp)
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def is_table_list_type(tp: Any) -> bool:
    """A TOML `[[array of tables]]` (list of dataclasses)."""
    tp = non_none(tp)
    return typing.get_origin(tp) is list and bool(typing.get_args(tp)) and is_table_type(typing.get_args(tp)[0])


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every init field of a config dataclass (string annotations are evaluated)."""
    return dict(_field_types(cls))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    # Memoised: evaluating string annotations compiles each one, and every load walks the whole tree several times
    # (schema check, build, dump). A class's annotations do not change after it is defined.
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:  # a type only imported under TYPE_CHECKING, or a class defined inside a function
        raise TypeError(f"config dataclass {cls.__qualname__}: cannot resolve its annotations ({e})") from None
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_schema(cls: type, _seen: frozenset = frozenset()) -> None:
    """Raise TypeError if a config dataclass (or a nested one) uses a field type the loader cannot read."""
    if cls in _seen:
        return
    for name, tp in field_types(cls).items():
        _check_type(tp, f"{cls.__qualname__}.{name}", _seen | {cls})


def _check_type(tp: Any, where: str, seen: frozenset) -> None:
    tp = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float, str, bool, Any, list, tuple, dict, type(None)):
        return
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        check_schema(tp, seen)
    elif origin is Literal:
        if not all(isinstance(a, (str, int, float, bool)) for a in args):
            raise TypeError(f"{where}: Literal choices must be strings, numbers or booleans")
    elif _is_union(tp) or origin in (list, tuple):
        for a in args:
            if a is not Ellipsis:
                _check_type(a, where, seen)
    elif origin is dict:
        if args and _strip(args[0]) is not str:
            raise TypeError(f"{where}: dict keys must be str (TOML keys are strings)")
        if args:
            _check_type(args[1], where, seen)
    else:
        raise TypeError(f"{where}: unsupported config field type {type_name(tp)}")


def type_name(tp: Any) -> str:
    """How a type is shown in messages and --help: `int`, `list[str]`, `"fp16" | "bf16"`, `float | None`."""
    tp = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(toml_value_text(a) for a in args)
    if _is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------------------------------------------
# Building the tree


def _toml_kind(v: Any) -> str:
    """The TOML name of a parsed value's type (what the user wrote)."""
    match v:
        case bool():
            return "boolean"
        case int():
            return "integer"
        case float():
            return "float"
        case str():
            return "string"
        case list() | tuple():
            return "array"
        case dict():
            return "table"
        case datetime.datetime() | datetime.date() | datetime.time():
            return "date/time"
        case _:
            return type(v).__name__


def convert(value: Any, tp: Any, path: tuple, base: Any = None) -> Any:
    """Check `value` (as parsed from TOML) against `tp`; return the typed value or raise TypeMismatch.

    `base` is the default instance a partial table starts from (only used for dataclass types).
    """
    tp = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        for choice in args:  # compare types too: True == 1 but true is not a valid choice 1
            if type(value) is type(choice) and value == choice:
                return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [a for a in args if isinstance(a, str)], n=1)
            hint = f'did you mean "{close[0]}"?' if close else ""
        raise TypeMismatch(path, f"one of {', '.join(toml_value_text(a) for a in args)}", value, hint)
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, path, base if isinstance(base, tp) else None)
        raise TypeMismatch(path, "a table", value)
    elif _is_union(tp):
        members = [a for a in args if a is not type(None)]
        first: TypeMismatch | None = None
        for member in members:
            try:
                return convert(value, member, path, base)
            except TypeMismatch as e:
                first = first or e
        if len(members) == 1 and first is not None:
            raise first  # Optional[X]: the message about X is the precise one
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return [convert(v, item, path + (i,)) for i, v in enumerate(value)]
    elif tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            if not args or len(args) == 2 and args[1] is Ellipsis:
                item = args[0] if args else Any
                return tuple(convert(v, item, path + (i,)) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(convert(v, a, path + (i,)) for i, (v, a) in enumerate(zip(value, args)))
            raise TypeMismatch(path, f"{type_name(tp)} (an array of {len(args)} values)", value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            item = args[1] if args else Any
            return {k: convert(v, item, path + (k,)) for k, v in value.items()}
    else:
        raise TypeError(f"unsupported config field type {type_name(tp)} at {dotted(path)}")
    raise TypeMismatch(path, type_name(tp), value)


def _build(cls: type, data: dict, path: tuple, base: Any = None) -> Any:
    """One dataclass from one TOML table. Keys not given come from `base` (the field's default instance) or the
    class defaults."""
    ftypes = field_types(cls)
    for key in data:
        if key not in ftypes:
            raise _Unknown(path, key, sorted(ftypes))
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in ftypes.items():
        default = getattr(base, name) if base is not None else _field_default(fields[name])
        if name in data:
            kwargs[name] = convert(data[name], tp, path + (name,), default)
        elif base is not None:
            kwargs[name] = copy.deepcopy(default)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a field without a default that the file does not give
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if not missing:
            raise
        raise _Missing(path, missing) from e


def _field_default(f: dataclasses.Field) -> Any:
    """The default a field would get (so a partial nested table starts from the declared default instance)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


class _Unknown(Exception):
    def __init__(self, path: tuple, key: str, valid: list[str]) -> None:
        super().__init__(key)
        self.path, self.key, self.valid = path, key, valid


class _Missing(Exception):
    def __init__(self, path: tuple, keys: list[str]) -> None:
        super().__init__(keys)
        self.path, self.keys = path, keys


def dotted(path: tuple) -> str:
    """("data", "subsets", 0, "repeats") -> "data.subsets[0].repeats"."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{toml_key_text(p)}" if out else toml_key_text(p))
    return out


def _table_of(path: tuple) -> str:
    """Where a key sits, as the user sees it: "in [optimizer]", "in [data.subsets[0]]" or "at the top level"."""
    i = len(path)
    while i and isinstance(path[i - 1], int):  # a list element belongs to its key, not to a table
        i -= 1
    table = path[: max(i - 1, 0)]
    return f"in [{dotted(table)}]" if table else "at the top level"


def _key_of(path: tuple) -> str:
    i = len(path)
    while i and isinstance(path[i - 1], int):
        i -= 1
    return dotted(path[max(i - 1, 0):])


def _short(value: Any) -> str:
    try:
        text = toml_value_text(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def mismatch_message(e: TypeMismatch) -> str:
    """'key 'lr' in [optimizer] must be float, got string "abc"' (without the file)."""
    where = f"key '{_key_of(e.path)}' {_table_of(e.path)}" if e.path else "the config"
    msg = f"{where} must be {e.expected}, got {_toml_kind(e.value)} {_short(e.value)}"
    return msg + (f"; {e.hint}" if e.hint else "")


def _unknown_message(e: _Unknown) -> str:
    table = _table_of(e.path + (e.key,))
    close = difflib.get_close_matches(e.key, e.valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{e.key}' {table}.{hint} Valid keys {table}: {', '.join(e.valid) or '(none)'}."


def build(root_cls: type, data: dict, *, source: str) -> Any:
    """Build the dataclass tree from a parsed TOML dict, without running validate(); errors name `source`."""
    check_schema(root_cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a TOML table, got {_toml_kind(data)}")
    try:
        return _build(root_cls, data, ())
    except _Unknown as e:
        raise ConfigError(f"{source}: {_unknown_message(e)}") from None
    except TypeMismatch as e:
        raise ConfigError(f"{source}: {mismatch_message(e)}") from None
    except _Missing as e:
        keys = ", ".join(f"'{k}'" for k in e.keys)
        raise ConfigError(f"{source}: {keys} must be set {_table_of(e.path + ('x',))} (no default)") from None


def run_validate(cfg: Any, *, source: str) -> None:
    """Call every dataclass's validate(): nested tables (and list entries) first, the root last."""
    try:
        _validate_tree(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _validate_tree(obj: Any) -> None:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _validate_tree(getattr(obj, f.name))
        if callable(getattr(obj, "validate", None)):
            obj.validate()
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _validate_tree(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            _validate_tree(v)


def read_toml(path: str | os.PathLike) -> dict:
    """Parse a TOML file; a missing file or a syntax error is a ConfigError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; check the path given to --config")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {e}") from None
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ConfigError(f"{path}: arrays or inline tables nested too deeply") from None
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        if "end of document" in msg:  # tomllib gives no line here; it is the last one
            msg = msg.replace("at end of document", f"at the end of the file, line {text.count(chr(10)) + 1}")
        raise ConfigError(f"{path}: TOML syntax error: {msg}") from None


NOT_TOML = object()  # parse_toml_value's answer for text that is not one TOML value


def parse_toml_value(raw: str) -> Any:
    """One TOML value from text (`1e-4`, `true`, `[1, 2]`, `"a"`), or NOT_TOML."""
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return NOT_TOML
    return parsed["v"] if list(parsed) == ["v"] else NOT_TOML  # "1\nother = 2" is not one value



# ----------------------------------------------------------------------------------------------------------------
# Writing the tree


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key_text(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_value_text(key)


def toml_value_text(v: Any) -> str:
    """A value as one line of TOML (arrays and tables inline)."""
    if isinstance(v, dict):
        items = ", ".join(f"{toml_key_text(k)} = {toml_value_text(x)}" for k, x in v.items())
        return "{ " + items + " }" if v else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value_text(x) for x in v) + "]"
    return tomli_w.dumps({"v": v})[len("v = "):].rstrip("\n")


def to_dict(cfg: Any) -> Any:
    """A config tree as plain TOML values: dataclasses -> dicts, tuples -> lists, None values left out."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out = {}
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if f.init and v is not None:
                out[f.name] = to_dict(v)
        return out
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items() if v is not None}
    return cfg



# ----------------------------------------------------------------------------------------------------------------
# Describing the tree (for --help and docs)


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of the tree: its dotted path (`optimizer`, `data.augment`) and help line."""

    path: str
    help: str


@dataclasses.dataclass(frozen=True)
class Option:
    """One key: its dotted path (`optimizer.learning_rate`), type, default (MISSING if none) and help line."""

    path: str
    type: Any
    default: Any
    help: str


def iter_options(root_cls: type) -> Iterator[Table | Option]:
    """Walk the tree in declaration order: top-level keys, then each Table followed by its keys (and sub-tables).

    A list of tables (`[[x]]`) is one Option: it is set in the config file, not on the command line.
    """
    yield from _walk(root_cls, (), _defaults(root_cls))


def _defaults(cls: type) -> Any:
    try:
        return cls()
    except TypeError:  # a field without a default
        return None


def _walk(cls: type, path: tuple, base: Any) -> Iterator[Table | Option]:
    ftypes = field_types(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for f in fields:
        if not is_table_type(ftypes[f.name]):
            default = getattr(base, f.name) if base is not None else dataclasses.MISSING
            yield Option(".".join(path + (f.name,)), ftypes[f.name], default, help_of(f))
    for f in fields:
        if is_table_type(ftypes[f.name]):
            sub_cls = non_none(ftypes[f.name])
            sub_base = getattr(base, f.name) if base is not None else None
            yield Table(".".join(path + (f.name,)), help_of(f))
            yield from _walk(sub_cls, path + (f.name,), sub_base if sub_base is not None else _defaults(sub_cls))
