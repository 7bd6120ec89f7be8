"""The generic config system: strict loading, messages, validate() order, dump/hash round trips, the command line."""

from __future__ import annotations  # string annotations, as the table modules use them

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from library.config.core import (
    Option,
    Table,
    config_hash,
    dump_toml,
    format_help,
    iter_options,
    load_config,
    parse_cli,
    save_resolved_config,
)
from library.config.fields import opt
from library.config.schema import check_schema
from library.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
CALLS: list[str] = []  # validate() hooks append their table's name, so the order can be checked


@dataclass
class Subset:
    image_dir: str = opt("", "Folder of images.")
    repeats: int = opt(1, "Times each image is seen per epoch.")
    caption_extension: Literal[".txt", ".caption"] = opt(".txt", "Caption file extension.")

    def validate(self) -> None:
        CALLS.append(f"subset:{self.image_dir}")
        if self.repeats < 1:
            raise ConfigError(f"subsets.repeats must be >= 1 (got {self.repeats}) for image_dir '{self.image_dir}'")


@dataclass
class Dataset:
    resolution: tuple[int, int] = opt((512, 512), "Width and height.")
    subsets: list[Subset] = opt([], "Image folders of this dataset.")


@dataclass
class ModelT:
    path: str = opt("tiny:sd15", "Base model file or folder.")
    prediction_type: Literal["epsilon", "v_prediction"] = opt("epsilon", "What the UNet predicts.")

    def validate(self) -> None:
        CALLS.append("model")


@dataclass
class OptimT:
    learning_rate: float = opt(1e-4, "Peak learning rate.")
    optimizer_type: Literal["adamw", "adamw8bit", "lion"] = opt("adamw", "Optimizer.")
    betas: tuple[float, float] = opt((0.9, 0.999), "Adam betas.")
    args: dict[str, Any] = opt({}, "Extra optimizer keyword arguments.")
    max_grad_norm: Optional[float] = opt(None, "Gradient clipping norm (unset: no clipping).")
    steps_per_level: list[int] = opt([], "Steps per level.")


@dataclass
class NoiseT:
    zero_terminal_snr: bool = opt(False, "Rescale the schedule to zero terminal SNR.")
    offset: float = opt(0.0, "Offset noise strength.")

    def validate(self) -> None:
        CALLS.append("noise")


@dataclass
class Root:
    seed: int = opt(0, "Random seed.")
    model: ModelT = opt(ModelT(), "Base model.")
    optimizer: OptimT = opt(OptimT(learning_rate=3e-4), "Optimizer.")
    noise: NoiseT = opt(NoiseT(), "Noise.")
    datasets: list[Dataset] = opt([], "Datasets.")
    tag_weights: dict[str, float] = opt({}, "Loss weight per tag.")
    extra: Optional[Subset] = opt(None, "An optional table.")

    def validate(self) -> None:
        CALLS.append("root")
        if self.noise.zero_terminal_snr and self.model.prediction_type != "v_prediction":
            raise ConfigError("noise.zero_terminal_snr = true needs model.prediction_type = 'v_prediction'")


ALIASES = {"learning_rate": "optimizer.learning_rate", "zero_terminal_snr": "noise.zero_terminal_snr",
           "optimizer_args": "optimizer.args"}


def cli(argv: list[str], **kw: Any):
    return parse_cli(Root, argv, aliases=ALIASES, prog="train_test.py", description="A test script.", **kw)


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------------------- load


def test_missing_tables_and_keys_take_defaults():
    assert load_config(Root, {}, source="x") == Root()
    cfg = load_config(Root, {"optimizer": {"optimizer_type": "lion"}}, source="x")
    # a partial table starts from the field's default instance (lr 3e-4), not from the class default (1e-4)
    assert cfg.optimizer == OptimT(learning_rate=3e-4, optimizer_type="lion")


def test_values_are_typed():
    cfg = load_config(Root, {"seed": 3, "optimizer": {"learning_rate": 1, "betas": [0.5, 0.6], "args": {"a": [1, "x"]},
                                                      "max_grad_norm": 2, "steps_per_level": [1, 2]},
                             "tag_weights": {"cat": 2}, "extra": {"image_dir": "a"}}, source="x")
    assert cfg.seed == 3
    assert cfg.optimizer.learning_rate == 1.0 and type(cfg.optimizer.learning_rate) is float
    assert cfg.optimizer.betas == (0.5, 0.6) and type(cfg.optimizer.betas) is tuple
    assert cfg.optimizer.args == {"a": [1, "x"]}
    assert cfg.optimizer.max_grad_norm == 2.0 and type(cfg.optimizer.max_grad_norm) is float
    assert cfg.tag_weights == {"cat": 2.0} and type(cfg.tag_weights["cat"]) is float
    assert cfg.extra == Subset(image_dir="a")


def test_unknown_key_names_file_table_key_suggestion_and_valid_keys():
    msg = error_of(load_config, Root, {"optimizer": {"learning_rat": 1e-4}}, source="run.toml")
    assert msg == ("run.toml: unknown key 'learning_rat' in [optimizer]. Did you mean 'learning_rate'? Valid keys in "
                   "[optimizer]: args, betas, learning_rate, max_grad_norm, optimizer_type, steps_per_level.")


def test_unknown_top_level_key():
    msg = error_of(load_config, Root, {"bogus_key_xyz": 1}, source="run.toml")
    assert msg == ("run.toml: unknown key 'bogus_key_xyz' at the top level. Valid keys at the top level: datasets, "
                   "extra, model, noise, optimizer, seed, tag_weights.")
    assert "Did you mean 'noise'" in error_of(load_config, Root, {"nosie": {}}, source="run.toml")


def test_unknown_key_in_nested_list_of_tables():
    data = {"datasets": [{}, {"subsets": [{"image_dir": "a", "repets": 2}]}]}
    msg = error_of(load_config, Root, data, source="ds.toml")
    assert msg.startswith("ds.toml: unknown key 'repets' in [datasets[1].subsets[0]]. Did you mean 'repeats'?")


@pytest.mark.parametrize("data, expected", [
    ({"seed": "1"}, "key 'seed' at the top level must be int, got string \"1\""),
    ({"seed": True}, "key 'seed' at the top level must be int, got boolean true"),
    ({"seed": 1.5}, "key 'seed' at the top level must be int, got float 1.5"),
    ({"optimizer": {"learning_rate": "abc"}}, "key 'learning_rate' in [optimizer] must be float, got string \"abc\""),
    ({"optimizer": {"learning_rate": False}}, "key 'learning_rate' in [optimizer] must be float, got boolean false"),
    ({"model": {"path": 5}}, "key 'path' in [model] must be str, got integer 5"),
    ({"noise": {"zero_terminal_snr": "true"}}, "key 'zero_terminal_snr' in [noise] must be bool, got string \"true\""),
    ({"optimizer": {"betas": [0.9]}},
     "key 'betas' in [optimizer] must be tuple[float, float] (an array of 2 values), got array [0.9]"),
    ({"optimizer": {"betas": [0.9, "x"]}}, "key 'betas[1]' in [optimizer] must be float, got string \"x\""),
    ({"optimizer": {"steps_per_level": [1, 2.5]}},
     "key 'steps_per_level[1]' in [optimizer] must be int, got float 2.5"),
    ({"optimizer": {"max_grad_norm": "none"}}, "key 'max_grad_norm' in [optimizer] must be float, got string \"none\""),
    ({"tag_weights": {"cat": "heavy"}}, "key 'cat' in [tag_weights] must be float, got string \"heavy\""),
    ({"tag_weights": 3}, "key 'tag_weights' at the top level must be dict[str, float], got integer 3"),
    ({"optimizer": 5}, "key 'optimizer' at the top level must be a table, got integer 5"),
    ({"datasets": {"resolution": [1, 1]}},
     "key 'datasets' at the top level must be list[table], got table { resolution = [1, 1] }"),
    ({"datasets": [{"resolution": [512, "768"]}]},
     "key 'resolution[1]' in [datasets[0]] must be int, got string \"768\""),
])
def test_wrong_type_names_key_expected_type_and_value(data, expected):
    assert error_of(load_config, Root, data, source="run.toml") == f"run.toml: {expected}"


def test_literal_lists_choices_and_suggests():
    msg = error_of(load_config, Root, {"optimizer": {"optimizer_type": "adamw8bt"}}, source="run.toml")
    assert msg == ('run.toml: key \'optimizer_type\' in [optimizer] must be one of "adamw", "adamw8bit", "lion", '
                   'got string "adamw8bt"; did you mean "adamw8bit"?')
    # a Literal compares types too: true is not the choice 1
    @dataclass
    class L:
        n: Literal[1, 2] = opt(1, "n")

    assert "must be one of 1, 2, got boolean true" in error_of(load_config, L, {"n": True}, source="x")
    assert load_config(L, {"n": 2}, source="x").n == 2


def test_nested_lists_of_tables_from_a_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent("""
        seed = 7
        [[datasets]]
        resolution = [768, 512]
          [[datasets.subsets]]
          image_dir = "a"
          repeats = 3
          [[datasets.subsets]]
          image_dir = "b"
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "c"
          caption_extension = ".caption"
    """))
    cfg = load_config(Root, path)
    assert cfg.seed == 7
    assert cfg.datasets == [
        Dataset(resolution=(768, 512), subsets=[Subset("a", 3), Subset("b")]),
        Dataset(subsets=[Subset("c", caption_extension=".caption")]),
    ]


def test_validate_runs_tables_first_root_last_and_names_the_source():
    CALLS.clear()
    load_config(Root, {"datasets": [{"subsets": [{"image_dir": "a"}, {"image_dir": "b"}]}]}, source="x")
    assert CALLS[-1] == "root"
    assert set(CALLS[:-1]) == {"model", "noise", "subset:a", "subset:b"}
    assert CALLS.index("subset:a") < CALLS.index("subset:b")
    msg = error_of(load_config, Root, {"noise": {"zero_terminal_snr": True}}, source="run.toml")
    assert msg == "run.toml: noise.zero_terminal_snr = true needs model.prediction_type = 'v_prediction'"
    ok = load_config(Root, {"noise": {"zero_terminal_snr": True}, "model": {"prediction_type": "v_prediction"}},
                     source="x")
    assert ok.noise.zero_terminal_snr
    msg = error_of(load_config, Root, {"datasets": [{"subsets": [{"image_dir": "q", "repeats": 0}]}]}, source="r.toml")
    assert msg == "r.toml: subsets.repeats must be >= 1 (got 0) for image_dir 'q'"


def test_file_errors_name_the_file_and_line(tmp_path):
    missing = tmp_path / "nope.toml"
    assert str(missing) in error_of(load_config, Root, missing)
    assert "is a folder" in error_of(load_config, Root, tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = 1\n[optimizer]\nlearning_rate = = 2\n")
    msg = error_of(load_config, Root, bad)
    assert msg.startswith(f"{bad}: TOML syntax error:") and "line 3" in msg
    bad.write_text("seed = 1\nseed =")
    assert "line 2" in error_of(load_config, Root, bad)
    bad.write_bytes(b"seed = \xff\n")
    assert str(bad) in error_of(load_config, Root, bad)
    bad.write_text("seed = 1\nseed = 2\n")
    assert str(bad) in error_of(load_config, Root, bad)


def test_unsupported_field_type_is_a_programming_error():
    @dataclass
    class Bad:
        s: set = opt(set(), "a set")

    with pytest.raises(TypeError, match="Bad.s: unsupported config field type set"):
        check_schema(Bad)
    with pytest.raises(TypeError):
        load_config(Bad, {}, source="x")


# ---------------------------------------------------------------------------------------------------------------- dump


def _rich() -> Root:
    return Root(
        seed=-3,
        model=ModelT(path='C:\\models\\a "b".safetensors', prediction_type="v_prediction"),
        optimizer=OptimT(learning_rate=1e-300, optimizer_type="lion", betas=(0.1, 0.30000000000000004),
                         args={"weird key": [1, {"x y": "z"}], "decouple": True, "d": {}}, max_grad_norm=1.5,
                         steps_per_level=[1, 2, 3]),
        noise=NoiseT(zero_terminal_snr=True, offset=0.05),
        datasets=[Dataset((768, 512), [Subset("a\nb", 2), Subset("é", caption_extension=".caption")]), Dataset()],
        tag_weights={"1girl": 2.0, "": 0.5},
        extra=Subset("x"),
    )


@pytest.mark.parametrize("cfg", [Root(), _rich()], ids=["defaults", "rich"])
def test_dump_toml_round_trips(cfg):
    text = dump_toml(cfg)
    assert load_config(Root, tomllib.loads(text), source="dump") == cfg
    assert load_config(Root, tomllib.loads(dump_toml(cfg, comments=False)), source="dump") == cfg


def test_dump_toml_has_help_comments_above_keys():
    text = dump_toml(_rich())
    lines = text.splitlines()
    assert lines[lines.index("learning_rate = 1e-300") - 1] == "# Peak learning rate."
    assert lines[lines.index("[optimizer]") - 1] == "# Optimizer."
    assert lines.count("[[datasets.subsets]]") == 2 and lines.count("[[datasets]]") == 2
    assert "# max_grad_norm is not set" in dump_toml(Root())
    assert not [line for line in dump_toml(Root(), comments=False).splitlines() if line.startswith("#")]


def test_dump_refuses_none_that_toml_cannot_express():
    cfg = Root()
    cfg.model.path = None
    with pytest.raises(ValueError, match="model.path"):
        dump_toml(cfg)


def test_config_hash_is_stable_and_changes_with_a_value():
    h = config_hash(_rich())
    assert h == config_hash(_rich()) and len(h) == 16 and int(h, 16) >= 0
    assert config_hash(load_config(Root, tomllib.loads(dump_toml(_rich())), source="x")) == h
    changed = _rich()
    changed.datasets[0].subsets[1].repeats = 5
    assert config_hash(changed) != h
    assert config_hash(Root()) != config_hash(Root(seed=1))
    assert config_hash(Root()) == "6fab5e84e1273af8"  # pinned: changes only if the canonical form changes


def test_save_resolved_config(tmp_path):
    path = save_resolved_config(_rich(), tmp_path / "out", "my_lora")
    assert path == tmp_path / "out" / "my_lora.config.toml"
    assert sorted(p.name for p in path.parent.iterdir()) == ["my_lora.config.toml"]  # no temp file left
    text = path.read_text()
    assert text.startswith(f"# resolved config, config_hash = {config_hash(_rich())}\n")
    assert load_config(Root, path) == _rich()


def test_iter_options_lists_tables_and_keys():
    items = list(iter_options(Root))
    assert items[0] == Option("seed", int, 0, "Random seed.")
    assert Table("optimizer", "Optimizer.") in items
    assert Option("optimizer.learning_rate", float, 3e-4, "Peak learning rate.") in items
    assert [i.path for i in items if isinstance(i, Table)] == ["model", "optimizer", "noise", "extra"]


# ---------------------------------------------------------------------------------------------------------------- CLI


def test_precedence_default_file_cli_including_aliases(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("seed = 5\n[optimizer]\nlearning_rate = 0.01\noptimizer_type = 'lion'\n")
    cfg, flags = cli([])
    assert cfg == Root() and flags.config is None
    cfg, flags = cli(["--config", str(path)])
    assert (cfg.seed, cfg.optimizer.learning_rate, cfg.optimizer.optimizer_type) == (5, 0.01, "lion")
    assert cfg.optimizer.betas == (0.9, 0.999)  # default kept
    assert flags.config == str(path)
    cfg, _ = cli(["--config", str(path), "--learning_rate", "2e-4", "--seed=9"])
    assert (cfg.seed, cfg.optimizer.learning_rate, cfg.optimizer.optimizer_type) == (9, 2e-4, "lion")
    cfg, _ = cli(["--optimizer.learning_rate=1", "--config_file", str(path), "--learning_rate=3"])
    assert cfg.optimizer.learning_rate == 3.0  # the later flag wins; flags beat the file whatever their order


def test_cli_value_forms():
    cfg, _ = cli(["--noise.zero_terminal_snr", "--model.prediction_type", "v_prediction"])
    assert cfg.noise.zero_terminal_snr is True and cfg.model.prediction_type == "v_prediction"
    cfg, _ = cli(["--zero_terminal_snr", "false", "--model.path", "C:/m/x y.safetensors"])
    assert cfg.noise.zero_terminal_snr is False and cfg.model.path == "C:/m/x y.safetensors"
    cfg, _ = cli(["--model.path=123", "--noise.offset", "-0.1", "--optimizer.betas=[0.5, 0.6]"])
    assert cfg.model.path == "123" and cfg.noise.offset == -0.1 and cfg.optimizer.betas == (0.5, 0.6)
    cfg, _ = cli(["--optimizer.args.decouple=true", "--optimizer.args.d_coef", "2", "--tag_weights.cat=0.5"])
    assert cfg.optimizer.args == {"decouple": True, "d_coef": 2} and cfg.tag_weights == {"cat": 0.5}
    cfg, _ = cli(["--optimizer_args={ a = 1 }", "--extra.repeats=4", "--model.path", '"quoted"'])
    assert cfg.optimizer.args == {"a": 1} and cfg.extra == Subset(repeats=4) and cfg.model.path == "quoted"
    cfg, _ = cli(["--optimizer.max-grad-norm", "1"])
    assert cfg.optimizer.max_grad_norm == 1.0


def test_script_flags():
    _, flags = cli(["--print-config", "--dry_run", "--cache-only"], extra_flags={"cache_only": "Cache and exit."})
    assert (flags.print_config, flags.dry_run, flags.extra) == (True, True, {"cache_only": True})
    _, flags = cli(["--print_config=false", "--dry-run", "false"], extra_flags={"cache_only": "Cache and exit."})
    assert (flags.print_config, flags.dry_run, flags.extra) == (False, False, {"cache_only": False})


@pytest.mark.parametrize("argv, expected", [
    (["--learning_rat", "1"], "unknown option --learning_rat. Did you mean --learning_rate?"),
    (["--optimizer.learning_rat=1"],
     "unknown option --optimizer.learning_rat. Did you mean --optimizer.learning_rate?"),
    (["--offset=1"], "unknown option --offset. Did you mean --noise.offset?"),
    (["--bogus_key_xyz"], "unknown option --bogus_key_xyz. Run with --help"),
    (["seed=1"], "unexpected command-line argument 'seed=1'"),
    (["--optimizer"], "--optimizer: [optimizer] is a table; set one of its keys, e.g. --optimizer.learning_rate=..."),
    (["--datasets.resolution=1"], "--datasets.resolution=1: [[datasets]] is a list of tables; set its entries in"),
    (["--seed"], "--seed needs a value: --seed=VALUE (type int)"),
    (["--seed", "--dry-run"], "--seed needs a value"),
    (["--config"], "--config needs a file"),
    (["--config="], "--config needs a file"),
    (["--seed", "x"], "command-line option --seed 'x': key 'seed' at the top level must be int, got string \"x\""),
    (["--optimizer.optimizer_type=adam"], 'must be one of "adamw", "adamw8bit", "lion", got string "adam"'),
    (["--optimizer.betas", "0.9,0.99"], "(write a TOML value, e.g. --optimizer.betas='[1, 2]'"),
    (["--dry-run=maybe"], "--dry-run=maybe: a script flag is true or false"),
    (["--zero_terminal_snr"],
     "command line: noise.zero_terminal_snr = true needs model.prediction_type = 'v_prediction'"),
])
def test_cli_errors(argv, expected):
    assert expected in error_of(cli, argv)


def test_cli_file_errors_name_the_file(tmp_path):
    assert str(tmp_path / "x.toml") in error_of(cli, ["--config", str(tmp_path / "x.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimizer]\nlerning_rate = 1\n")
    msg = error_of(cli, ["--config", str(bad), "--seed=1"])
    assert msg.startswith(f"{bad}: unknown key 'lerning_rate' in [optimizer]. Did you mean 'learning_rate'?")
    bad.write_text("[noise]\nzero_terminal_snr = true\n")
    assert error_of(cli, ["--config", str(bad), "--seed=1"]).startswith(f"{bad} + command line: noise.zero_terminal")
    cfg, _ = cli(["--config", str(bad), "--model.prediction_type=v_prediction"])  # the CLI can fix the file's problem
    assert cfg.noise.zero_terminal_snr


def test_help_lists_every_table_and_key(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--seed", "x", "--help"], extra_flags={"cache_only": "Cache latents and exit."})
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: train_test.py [--config FILE]")
    assert "A test script." in out and "highest priority first" in out
    for line in ["  --seed int = 0", "      Random seed.", "[optimizer]  Optimizer.",
                 "  --optimizer.learning_rate float = 0.0003", '  --optimizer.optimizer_type "adamw" | "adamw8bit" | '
                 '"lion" = "adamw"', "  --optimizer.betas tuple[float, float] = [0.9, 0.999]",
                 "  --optimizer.max_grad_norm float | None = (not set)", "  [[datasets]]  (list of tables, set in the "
                 "config file)", "  --cache-only           Cache latents and exit.",
                 "  --learning_rate        --optimizer.learning_rate", "[extra]  An optional table."]:
        assert line in out.splitlines(), line
    assert out == format_help(Root, prog="train_test.py", description="A test script.", aliases=ALIASES,
                              extra_flags={"cache_only": "Cache latents and exit."}) + "\n"


def test_bad_declarations_are_programming_errors():
    with pytest.raises(ValueError, match="not a settable key"):
        parse_cli(Root, [], aliases={"lr": "optimizer.lr"}, prog="p", description="d")
    with pytest.raises(ValueError, match="clashes"):
        parse_cli(Root, [], aliases={}, prog="p", description="d", extra_flags={"seed": "x"})


def test_print_config_output_round_trips_through_the_cli(tmp_path):
    cfg, _ = cli(["--learning_rate=0.5", "--optimizer.args.x=[1, 2]", "--extra.image_dir=q"])
    path = tmp_path / "resolved.toml"
    path.write_text(dump_toml(cfg))
    again, _ = cli(["--config", str(path)])
    assert again == cfg and config_hash(again) == config_hash(cfg)


SCRIPT = '''
import sys
from dataclasses import dataclass
from library.cli import main_guard
from library.config.core import parse_cli
from library.config.fields import opt


@dataclass
class Train:
    steps: int = opt(10, "Steps.")


@dataclass
class Root:
    train: Train = opt(Train(), "Training.")


@main_guard
def main(argv):
    cfg, flags = parse_cli(Root, argv, aliases={}, prog="tiny.py", description="Tiny.")
    print("steps", cfg.train.steps)


sys.exit(main(sys.argv[1:]))
'''


def test_script_exits_2_on_unknown_top_level_key_without_traceback(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(SCRIPT)
    config = tmp_path / "run.toml"
    config.write_text("bogus_key_xyz = 1\n[train]\nsteps = 3\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(script), "--config", str(config)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=60)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith(f"error: {config}: unknown key 'bogus_key_xyz' at the top level.")
    config.write_text("[train]\nsteps = 3\n")
    run = subprocess.run([sys.executable, str(script), "--config", str(config), "--train.steps", "4"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (0, "steps 4\n", "")
