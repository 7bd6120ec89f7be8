"""The command line of every script: `--config FILE`, per-key overrides, sd-scripts names, and script flags.

Precedence, highest first:
  1. command-line overrides: `--table.key=value` or `--table.key value` (`--optimizer.learning_rate 1e-4`), or an
     sd-scripts name that the script maps to a key through `aliases` (`--learning_rate 1e-4`). When a key is given
     twice, the later flag wins;
  2. the TOML file given with `--config FILE` (`--config_file` is accepted too, as in sd-scripts);
  3. the defaults declared in the config dataclasses.

A value is parsed as a TOML value (`1e-4`, `true`, `"text"`, `[1024, 1024]`); if it is not valid TOML, or its TOML
type does not fit the key, it is taken as a plain string (so `--model.path C:/models/x.safetensors` needs no quotes).
A boolean key alone (`--train.gradient_checkpointing`) means true; `--key false` or `--key=false` turns it off.
Dashes in names are read as underscores (`--print-config` = `--print_config`). Keys of a dict table are set with one
more dot (`--optimizer.args.decouple=true`); lists of tables (`[[data.subsets]]`) are set in the file only.

File errors name the file; override errors name the flag; `validate()` errors name both sources.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any

from library.config.schema import (
    NOT_TOML,
    Option,
    Table,
    TypeMismatch,
    build,
    check_schema,
    convert,
    field_types,
    is_table_list_type,
    is_table_type,
    iter_options,
    mismatch_message,
    non_none,
    parse_toml_value,
    read_toml,
    run_validate,
    to_dict,
    toml_value_text,
    type_name,
)
from library.errors import ConfigError

SCRIPT_FLAGS = {
    "print_config": "print the resolved config as TOML and exit",
    "dry_run": "check the config and inputs, then exit without training",
}
_CONFIG_FLAGS = ("config", "config_file")
_BOOLS = ("true", "false")


@dataclasses.dataclass
class Flags:
    """What the command line asked the script itself to do (not part of the config)."""

    config: str | None = None  # the --config file, if any
    print_config: bool = False
    dry_run: bool = False
    extra: dict[str, bool] = dataclasses.field(default_factory=dict)  # the script's own boolean flags, by name


def parse_cli(
    root_cls: type,
    argv: list[str],
    *,
    aliases: dict[str, str] | None = None,
    prog: str,
    description: str,
    extra_flags: dict[str, str] | None = None,
) -> tuple[Any, Flags]:
    """Resolve a config from defaults, `--config FILE` and command-line overrides; return it with the script flags.

    `aliases` maps sd-scripts flag names to dotted keys ({"learning_rate": "optimizer.learning_rate"}); `extra_flags`
    declares the script's own boolean flags (name -> help). `--help` prints every option and exits with status 0.
    Every user mistake raises ConfigError.
    """
    aliases = {k.replace("-", "_"): v for k, v in (aliases or {}).items()}
    extra = {k.replace("-", "_"): v for k, v in (extra_flags or {}).items()}
    check_schema(root_cls)
    _check_declarations(root_cls, aliases, extra)
    if any(a in ("-h", "--help") for a in argv):
        print(format_help(root_cls, prog=prog, description=description, aliases=aliases, extra_flags=extra))
        raise SystemExit(0)

    flags = Flags(extra={name: False for name in extra})
    overrides: list[tuple[tuple, Any]] = []
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected command-line argument {arg!r}: options start with --, "
                              f"e.g. --config run.toml (run with --help to list them)")
        name, eq, value = arg[2:].partition("=")
        norm = name.replace("-", "_")
        if norm in _CONFIG_FLAGS:
            if not eq:
                if i >= len(argv) or argv[i].startswith("--"):
                    raise ConfigError(f"--{name} needs a file: --{name} run.toml")
                value, i = argv[i], i + 1
            if not value:
                raise ConfigError(f"--{name} needs a file: --{name} run.toml")
            flags.config = value
            continue
        if norm in SCRIPT_FLAGS or norm in extra:
            if not eq and i < len(argv) and argv[i] in _BOOLS:
                eq, value, i = "=", argv[i], i + 1
            on = _flag_bool(arg, value if eq else None)
            if norm in extra:
                flags.extra[norm] = on
            else:
                setattr(flags, norm, on)
            continue
        path, tp = _resolve(root_cls, aliases[norm] if norm in aliases else name, arg, aliases, extra)
        if not eq:
            if non_none(tp) is bool:
                if i < len(argv) and argv[i] in _BOOLS:
                    value, i = argv[i], i + 1
                else:
                    value = "true"
            elif i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                raise ConfigError(f"--{name} needs a value: --{name}=VALUE (type {type_name(tp)})")
        overrides.append((path, _cli_value(value, tp, path, f"--{name}")))

    data = read_toml(flags.config) if flags.config else {}
    if flags.config:
        data = _file_aliases(data, aliases, root_cls, flags.config)
        build(root_cls, data, source=flags.config)  # file mistakes are reported against the file alone
    for path, value in overrides:
        _set(data, path, value)
    sources = ([flags.config] if flags.config else []) + (["command line"] if overrides else [])
    source = " + ".join(sources) or "defaults"
    cfg = build(root_cls, data, source=source)
    run_validate(cfg, source=source)
    return cfg, flags


def _file_aliases(data: dict, aliases: dict[str, str], root_cls: type, source: str) -> dict:
    """sd-scripts names written as top-level keys of the file (`network_dim = 16`, as in an sd-scripts
    `--config_file`) are moved to the key they name; the table's own key wins a clash, which is an error."""
    top = set(field_types(root_cls))
    out = {k: v for k, v in data.items() if k in top or k not in aliases}
    for name, value in data.items():
        if name in top or name not in aliases:
            continue
        path, _ = _resolve(root_cls, aliases[name], f"{name} in {source}", {}, {})
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {name} sets {aliases[name]}, but [{key}] is not a table there")
        if path[-1] in node:
            raise ConfigError(f"{source}: {name} and {aliases[name]} both set {aliases[name]}; keep one")
        node[path[-1]] = value
    return out


def _flag_bool(arg: str, value: str | None) -> bool:
    if value is None or value == "true":
        return True
    if value == "false":
        return False
    raise ConfigError(f"{arg}: a script flag is true or false, e.g. {arg.partition('=')[0]}=false")


def _resolve(root_cls: type, dotted: str, arg: str, aliases: dict, extra: dict) -> tuple[tuple, Any]:
    """A flag's dotted key -> (path in the TOML tree, field type). Unknown keys suggest the closest option."""
    tp: Any = root_cls
    path: tuple = ()
    for part in dotted.split("."):
        here = non_none(tp)
        if isinstance(here, type) and dataclasses.is_dataclass(here):
            key = part.replace("-", "_")
            ftypes = field_types(here)
            if key not in ftypes:
                raise ConfigError(_unknown_flag(arg, root_cls, aliases, extra))
            tp, path = ftypes[key], path + (key,)
            if is_table_list_type(tp):
                raise ConfigError(f"{arg}: [[{'.'.join(path)}]] is a list of tables; set its entries in the "
                                  f"--config file")
        elif here is Any or here is dict or typing.get_origin(here) is dict:
            args = typing.get_args(here)
            tp, path = (args[1] if args else Any), path + (part,)
        else:
            raise ConfigError(_unknown_flag(arg, root_cls, aliases, extra))
    if is_table_type(tp):
        keys = [o.path for o in iter_options(non_none(tp)) if isinstance(o, Option)]
        example = f", e.g. --{dotted}.{keys[0]}=..." if keys else ""
        raise ConfigError(f"{arg}: [{dotted}] is a table; set one of its keys{example}")
    return path, tp


def _unknown_flag(arg: str, root_cls: type, aliases: dict[str, str], extra: dict[str, str]) -> str:
    name = arg[2:].partition("=")[0].replace("-", "_")
    keys = [o.path for o in iter_options(root_cls) if isinstance(o, Option)]
    names = keys + list(aliases) + list(SCRIPT_FLAGS) + list(extra) + ["config"]
    leaf = name.rpartition(".")[2]
    # an sd-scripts name without an alias usually is the leaf of one key (--max_train_steps -> train.max_train_steps)
    close = [k for k in keys if k.rpartition(".")[2] == leaf] or difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {' or '.join('--' + c for c in close)}?" if close else ""
    return f"unknown option --{name}.{hint} Run with --help to list every option."


def _cli_value(raw: str, tp: Any, path: tuple, flag: str) -> Any:
    """Parse an override as TOML; if that fails or does not fit the key's type, as a plain string."""
    candidates = [raw]
    parsed = parse_toml_value(raw)
    if parsed is not NOT_TOML:
        candidates.insert(0, parsed)
    first: TypeMismatch | None = None
    for value in candidates:
        try:
            return convert(value, tp, path)
        except TypeMismatch as e:
            first = first or e
    assert first is not None
    hint = ""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if any(typing.get_origin(m) in (list, tuple, dict) for m in members):
        hint = f" (write a TOML value, e.g. {flag}='[1, 2]' or {flag}='{{ key = 1 }}')"
    raise ConfigError(f"command-line option {flag} {raw!r}: {mismatch_message(first)}{hint}")


def _set(data: dict, path: tuple, value: Any) -> None:
    """Put an override into the parsed TOML tree, creating the tables it lives in."""
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)


def _check_declarations(root_cls: type, aliases: dict[str, str], extra: dict[str, str]) -> None:
    """Programming mistakes in a script's declarations (not user errors): a bad alias target, a name clash."""
    top = set(field_types(root_cls))
    reserved = set(SCRIPT_FLAGS) | set(_CONFIG_FLAGS) | {"help", "h"}
    for name, target in aliases.items():
        if name in reserved or name in extra:
            raise ValueError(f"alias --{name} clashes with a script flag")
        try:
            _resolve(root_cls, target, f"--{name}", {}, {})
        except ConfigError as e:
            raise ValueError(f"alias --{name} -> {target!r} is not a settable key: {e}") from None
    for name in extra:
        if name in reserved or name in top:
            raise ValueError(f"extra flag --{name} clashes with a script flag or a config key")


def format_help(
    root_cls: type,
    *,
    prog: str,
    description: str,
    aliases: dict[str, str] | None = None,
    extra_flags: dict[str, str] | None = None,
) -> str:
    """--help text generated from the dataclasses: every table and key with its type, default and help line."""
    out = [
        f"usage: {prog} [--config FILE] [--TABLE.KEY VALUE ...] [--print-config] [--dry-run] [--help]",
        "",
        description.strip(),
        "",
        "Settings come from, highest priority first: command-line options, the --config file, the defaults below.",
        "Values are read as TOML (1e-4, true, \"text\", [1024, 1024]); anything else is taken as a string.",
        "",
        "script options:",
        _line("--config FILE", "TOML config file, one [table] per section below"),
    ]
    for name, help_ in {**SCRIPT_FLAGS, **(extra_flags or {})}.items():
        out.append(_line(f"--{name.replace('_', '-')}", help_))
    out.append(_line("-h, --help", "show this help and exit"))
    items = list(iter_options(root_cls))
    if items and isinstance(items[0], Option):
        out += ["", "top-level keys:"]
    for item in items:
        if isinstance(item, Table):
            out += ["", f"[{item.path}]" + (f"  {item.help}" if item.help else "")]
        elif is_table_list_type(item.type):
            out.append(f"  [[{item.path}]]  (list of tables, set in the config file)")
            out.append(f"      {item.help}")
        else:
            out.append(f"  --{item.path} {type_name(item.type)} = {_default_text(item.default)}")
            if item.help:
                out.append(f"      {item.help}")
    if aliases:
        out += ["", "sd-scripts names:"]
        out += [_line(f"--{name}", f"--{target}") for name, target in aliases.items()]
    return "\n".join(out)


def _line(left: str, right: str) -> str:
    return f"  {left:<22} {right}"


def _default_text(default: Any) -> str:
    if default is dataclasses.MISSING:
        return "(required)"
    if default is None:
        return "(not set)"
    return toml_value_text(to_dict(default))
