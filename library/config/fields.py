"""`opt()`: how every config field is declared, so each one carries its default and its one-line help."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any


def opt(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a default and a help line (shown by --help and --print-config).

    Mutable defaults (lists, dicts, nested table dataclasses) are copied per instance.
    """
    meta = {"help": help, **metadata}
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def unset_copy(cls: type, name: str) -> type:
    """A dataclass named `name` with the fields of the dataclass `cls`, each `X | None` and None (not set) by default,
    with the same help: how a table whose keys may be left to another level declares them (dataset_file.py)."""
    import typing

    hints = typing.get_type_hints(cls)
    made = dataclasses.make_dataclass(
        name, [(f.name, hints[f.name] | None, opt(None, help_of(f))) for f in dataclasses.fields(cls)])
    made.__module__ = cls.__module__
    return made
