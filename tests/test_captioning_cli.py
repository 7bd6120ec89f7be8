"""Every flag caption_images.py --help lists is run here: each key and sd-scripts name reaches the key it names
(read back from --print-config); the script's own flags are run by tests/test_captioning_run.py (named below)."""

from __future__ import annotations

import re
import sys
import typing

import pytest

import caption_images
from library.config.cli import format_help
from library.config.schema import Option, iter_options, non_none

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HELP = format_help(caption_images.CONFIG_CLASS, prog="caption_images.py", description=caption_images.__doc__,
                   aliases=caption_images.ALIASES, extra_flags=caption_images.EXTRA_FLAGS)
FLAGS = sorted(set(re.findall(r"^  (--[\w.-]+)", HELP, re.M)))
# The script's own flags and the test that runs each (tests/test_captioning_run.py).
SCRIPT_FLAGS = {"--config": "test_config_file_and_command_line", "--print-config": "test_every_key_and_alias",
                "--dry-run": "test_dry_run_plans_without_loading_or_writing",
                "--no-progress": "test_config_file_and_command_line"}
DATASET_KEYS = {"dataset_path", "dataset_split", "image_column", "caption_column", "output_dataset"}
TYPES = {o.path: o.type for o in iter_options(caption_images.CONFIG_CLASS) if isinstance(o, Option)}
SPECIAL = {"caption.caption_extension": ".caption", "caption.tagger.caption_separator": "; ",
           "caption.short.max_new_tokens": 25, "caption.detailed.max_new_tokens": 200, "caption.text.prompt": "a b"}


def value_for(key: str):
    """A value the key accepts and that differs from its default."""
    if key in SPECIAL:
        return SPECIAL[key]
    tp = non_none(TYPES[key])
    if tp is bool:
        return True
    if tp is int:
        return 2
    if tp is float:
        return 0.5
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)[-1]
    if tp is str:
        return "some/where"
    return ["x y", "z"]  # list[str] | str


def cli_text(value) -> list[str]:
    if value is True:
        return []
    if isinstance(value, list):
        return ['["' + '", "'.join(value) + '"]']
    return [str(value)]


def test_help_lists_keys_aliases_and_script_flags():
    keys = {"--" + k for k in TYPES}
    aliases = {"--" + a for a in caption_images.ALIASES}
    assert set(FLAGS) == keys | aliases | set(SCRIPT_FLAGS), set(FLAGS) ^ (keys | aliases | set(SCRIPT_FLAGS))


@pytest.mark.parametrize("flag", [f for f in FLAGS if f not in SCRIPT_FLAGS])
def test_every_key_and_alias(flag, capsys):
    name = flag[2:]
    key = caption_images.ALIASES.get(name, name)
    value = value_for(key)
    # the mode needs its models, a dataset key a dataset; the flag under test comes last, so it wins over these
    source = (["--caption.dataset_path", "d", "--caption.output_dataset", "o"] if key.split(".")[1] in DATASET_KEYS
              else ["imgs"])
    args = [*source, "--model", "m", "--repo_id", "t", flag, *cli_text(value), "--print-config"]
    assert caption_images.main(args) == 0
    node = tomllib.loads(capsys.readouterr().out)
    for part in key.split("."):
        node = node[part]
    assert node == value, (flag, node)


def test_print_config_loads_back_equal(capsys):
    from library.config.core import load_config

    args = ["imgs", "--mode", "levels", "--model", "m", "--repo_id", "t", "--undesired_tags", "a b,c",
            "--caption.detailed.prompt", "<MORE_DETAILED_CAPTION>", "--print-config"]
    assert caption_images.main(args) == 0
    cfg = load_config(caption_images.CONFIG_CLASS, tomllib.loads(capsys.readouterr().out))
    assert cfg.caption.tagger.undesired_tags == "a b,c" and cfg.caption.detailed.prompt == "<MORE_DETAILED_CAPTION>"
    assert (cfg.caption.mode, cfg.caption.model, cfg.caption.tagger.model, cfg.caption.image_dir) == (
        "levels", "m", "t", "imgs")
