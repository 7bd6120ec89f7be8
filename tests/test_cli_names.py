"""sd-scripts names reach every script's parser: each table's KOHYA_NAMES and the common flags, on the command line
and as top-level keys of the TOML file (as in an sd-scripts `--config_file`); merge_models.py takes the training
scripts' `--output_dir` too (issue 16, bugs 2 and 6)."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import pytest
import tomli_w

import merge_models
import train_dreambooth
import train_hypernetwork
import train_lora
import train_native
import train_textual_inversion
from library.config import diffusion, embedding, network
from library.config.run import SD_SCRIPTS_ALIASES, sd_scripts_names
from library.config.schema import field_types, non_none

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TRAINING = [train_native, train_lora, train_textual_inversion, train_hypernetwork, train_dreambooth]
TABLES = {"diffusion": diffusion.KOHYA_NAMES, "network": network.KOHYA_NAMES, "embedding": embedding.KOHYA_NAMES,
          "common": SD_SCRIPTS_ALIASES}
QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml"
BASES = {train_dreambooth: QUICKSTART.with_name("quickstart_dreambooth.toml")}  # DreamBooth needs a concept


def _target_type(root: type, dotted: str):
    tp = root
    for part in dotted.split("."):
        tp = field_types(non_none(tp))[part]
    return non_none(tp)


def _other_value(tp, current):
    """A value of type `tp` different from `current`, as TOML text for the command line, and as the parsed value."""
    members = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, getattr(__import__("types"), "UnionType")) else [tp]
    if int in members or float in members:  # int | list[int] (resolution), a float or an unset (None) number
        tp, current = (int if int in members else float), (current if isinstance(current, (int, float)) else 0)
    if tp is bool:
        return "true" if not current else "false", not current
    if tp is int:
        return str(current + 3), current + 3
    if tp is float:
        return repr(current + 0.25), current + 0.25
    if typing.get_origin(tp) is typing.Literal:
        other = next(v for v in typing.get_args(tp) if v != current)
        return other, other
    if typing.get_args(tp) and any(typing.get_origin(a) is list for a in typing.get_args(tp)):  # str | list[float]
        return "cosine", "cosine"
    if typing.get_origin(tp) is list:
        return "[]", []
    return "some_value", "some_value"


def _get(tree: dict, dotted: str):
    """The printed value at `dotted`; None where the key is unset (--print-config leaves unset keys out)."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _cases():
    for module in TRAINING:
        root = module.CONFIG_CLASS
        tables = {f.name for f in dataclasses.fields(root)}
        for table, names in TABLES.items():
            for name, target in names.items():
                if target.partition(".")[0] in tables:
                    yield pytest.param(module, name, target, id=f"{module.__name__}--{name}")


@pytest.mark.parametrize("module,name,target", list(_cases()))
def test_every_sd_scripts_name_is_accepted_on_the_command_line(module, name, target, capsys):
    root = module.CONFIG_CLASS
    base = ["--config", str(BASES[module])] if module in BASES else []
    default = _get(tomllib.loads(_print(module, base, capsys)), target)
    text, value = _other_value(_target_type(root, target), default)
    if value == default or value == []:  # a list default: any other valid list needs per-model lengths
        text, value = repr(default).replace("'", '"') if isinstance(default, list) else text, default
    capsys.readouterr()
    rc = module.main([*base, f"--{name}", text, "--print-config"])
    out, err = capsys.readouterr()
    if rc == 0:
        assert _get(tomllib.loads(out), target) == value
    else:  # reached its key, whose cross-field rule then refused the lone value (e.g. an adaptive offset needs one)
        assert rc == 2 and "unknown option" not in err and target in err, err


def test_names_reach_only_scripts_with_their_table():
    assert "network_dim" in sd_scripts_names(train_lora.CONFIG_CLASS)
    assert "network_dim" not in sd_scripts_names(train_native.CONFIG_CLASS)
    assert "token_string" in sd_scripts_names(train_textual_inversion.CONFIG_CLASS)
    assert sd_scripts_names(train_native.CONFIG_CLASS)["ip_noise_gamma"] == "noise.input_perturbation"


def test_issue_command_sets_both_values(capsys):
    out = tomllib.loads(_print(train_lora, ["--config", str(QUICKSTART), "--network_dim", "16", "--noise_offset",
                                            "0.05"], capsys))
    assert out["network"]["network_dim"] == 16 and out["noise"]["offset"] == 0.05


def test_names_as_top_level_keys_of_the_file(tmp_path, capsys):
    doc = tomllib.loads(QUICKSTART.read_text())
    doc["network"].pop("network_dim", None)
    doc.update({"network_dim": 12, "min_snr_gamma": 5.0, "network_train_unet_only": True})
    path = tmp_path / "flat.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    out = tomllib.loads(_print(train_lora, ["--config", str(path)], capsys))
    assert out["network"]["network_dim"] == 12 and out["network"]["train_unet_only"] is True
    assert out["loss"]["min_snr_gamma"] == 5.0


def test_a_name_and_its_key_both_in_the_file_is_one_error(tmp_path, capsys):
    doc = tomllib.loads(QUICKSTART.read_text())
    doc["network_dim"] = 12
    doc.setdefault("network", {})["network_dim"] = 8
    path = tmp_path / "both.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    assert train_lora.main(["--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "network_dim and network.network_dim both set network.network_dim" in err[0]


@pytest.mark.parametrize("flag", ["--output_dir", "--save_to"])
def test_merge_takes_the_training_scripts_output_name(flag, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert merge_models.main(["--config", "configs/quickstart_merge.toml", flag, str(out), "--print-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["output"]["path"] == str(out)


def _print(module, argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert module.main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out
