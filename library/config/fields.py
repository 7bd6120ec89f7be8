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
