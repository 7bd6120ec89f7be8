"""The generic config loader: TOML tables -> a tree of dataclasses declared with `library.config.fields.opt`.

Works on any dataclass tree; each table module (model.py, optim.py, ...) only declares fields. This module is the
public face of the config system:

- `load_config(Root, "run.toml", source=...)` builds the tree strictly: an unknown key names the file, the table, the
  closest valid key and every valid key; a wrong type names the key, the expected type and the value given. Missing
  tables and keys take their defaults (the field's default instance, so a partial `[table]` keeps its other defaults).
  After building, every dataclass's `validate()` runs, innermost tables first and the root last, so the root can check
  rules that span tables.
- `parse_cli(Root, argv, ...)` adds `--config FILE` and command-line overrides (precedence: command line > file >
  defaults; see `library.config.cli`).
- `dump_toml(cfg)` writes the fully resolved config with each key's help as a comment; it loads back to an equal config.
- `config_hash(cfg)` hashes a canonical (sorted, comment-free) TOML, so the same settings give the same hash.
- `save_resolved_config(cfg, out_dir, name)` writes `<name>.config.toml` atomically beside an output.

Which field types are supported, and the error messages, live in `library.config.schema`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import tomli_w

from library.config.cli import Flags, format_help, parse_cli
from library.config.fields import help_of
from library.config.schema import (
    Option,
    Table,
    build,
    dotted,
    field_types,
    is_table_list_type,
    is_table_type,
    iter_options,
    read_toml,
    run_validate,
    to_dict,
    toml_key_text,
    toml_value_text,
)
from library.fileio import atomic_path

__all__ = [
    "Flags",
    "Option",
    "Table",
    "config_hash",
    "dump_toml",
    "format_help",
    "iter_options",
    "load_config",
    "parse_cli",
    "read_toml",
    "save_resolved_config",
    "to_dict",
]


def load_config(root_cls: type, toml_dict_or_path: dict | str | os.PathLike, *, source: str | None = None) -> Any:
    """Build and validate a config tree from a parsed TOML dict or a TOML file.

    `source` names where the values came from in error messages (default: the file path, or "config").
    """
    if isinstance(toml_dict_or_path, dict):
        data, source = toml_dict_or_path, source or "config"
    else:
        data, source = read_toml(toml_dict_or_path), source or str(toml_dict_or_path)
    cfg = build(root_cls, data, source=source)
    run_validate(cfg, source=source)
    return cfg


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()]


def dump_toml(cfg: Any, *, comments: bool = True) -> str:
    """The fully resolved config as TOML, each key preceded by its help line; `load_config` reads it back equal.

    An unset Optional key (None) is written as a comment, since TOML has no null and a left-out key means its default;
    None in a field whose default is not None cannot be written (ValueError: a programming error, not a user one).
    """
    lines: list[str] = []
    _dump_table(cfg, (), lines, comments)
    return "\n".join(lines).strip("\n") + "\n"


def _dump_table(obj: Any, path: tuple, lines: list[str], comments: bool) -> None:
    fields = [f for f in dataclasses.fields(obj) if f.init]
    ftypes = field_types(type(obj))
    later = []  # sub-tables go after the plain keys: in TOML a key after a [header] belongs to that header
    for f in fields:
        v, tp = getattr(obj, f.name), ftypes[f.name]
        if v is not None and (is_table_type(tp) or (is_table_list_type(tp) and v)):
            later.append(f)
            continue
        if comments and help_of(f):
            lines.extend(_comment(help_of(f)))
        if v is None:
            if f.default is not None:  # TOML has no null: a left-out key means the default, which is not None
                raise ValueError(f"{dotted(path + (f.name,))} is None but its default is not; TOML cannot say that")
            if comments:
                lines.append(f"# {f.name} is not set")
        else:
            lines.append(f"{toml_key_text(f.name)} = {toml_value_text(to_dict(v))}")
    for f in later:
        v, sub = getattr(obj, f.name), path + (f.name,)
        header = ".".join(toml_key_text(p) for p in sub)
        help_lines = _comment(help_of(f)) if comments and help_of(f) else []
        for item in v if isinstance(v, list) else [v]:
            lines.append("")
            lines.extend(help_lines)
            lines.append(f"[[{header}]]" if isinstance(v, list) else f"[{header}]")
            _dump_table(item, sub, lines, comments)


def config_hash(cfg: Any) -> str:
    """sha256 (first 16 hex digits) of the canonical TOML: sorted keys, no comments, None values left out."""
    canonical = tomli_w.dumps(_sorted(to_dict(cfg)))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _sorted(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _sorted(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [_sorted(x) for x in v]
    return v


def save_resolved_config(cfg: Any, out_dir: str | os.PathLike, name: str) -> Path:
    """Write `<out_dir>/<name>.config.toml` (atomically) with the resolved config and its hash; return the path."""
    path = Path(out_dir) / f"{name}.config.toml"
    text = f"# resolved config, config_hash = {config_hash(cfg)}\n\n" + dump_toml(cfg)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
