"""The caption keys have one declaration (library/config/caption_keys.py, issue 16): `[data]`, every level of a
dataset TOML, the resolved subset and the caption transforms take them from it; a subset's value of each reaches the
transforms' options; and one rule (`VARYING`) says which options make captions change between two times an image is
seen, for text-encoder output caching and the validation captions alike."""

from __future__ import annotations

import dataclasses
import random
import sys
import typing

import pytest

from library.config import dataset_file
from library.config.caption_keys import (CAPTION_KEYS, VARYING, CaptionKeys, varying_caption_keys,
                                         without_varying)
from library.config.data import DataConfig
from library.config.schema import field_types
from library.data.captions import CaptionOptions, transform_caption
from library.data.demo import resolve_dataset_ref
from library.data.loader import build_train_data
from library.errors import ConfigError

# What users write in sd-scripts dataset TOML subsets and in [data] (sd-scripts' names): these must stay.
SD_SCRIPTS_CAPTION_KEYS = {"caption_extension", "caption_separator", "secondary_separator", "keep_tokens",
                           "keep_tokens_separator", "shuffle_caption", "caption_dropout_rate",
                           "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "caption_prefix",
                           "caption_suffix"}
# [data]-only caption techniques the transforms' options carry too, under the same names.
RUN_WIDE = {"multilevel_tag_dropout", "protected_tags", "synonyms", "synonym_probability", "tag_order",
            "caption_levels"}
SUBSET_TABLES = (dataset_file.GeneralTable, dataset_file.DatasetTable, dataset_file.SubsetTable)


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _own_annotations(cls) -> set[str]:
    return set(vars(cls).get("__annotations__", {}))


def test_every_place_takes_the_caption_keys_from_the_one_declaration():
    assert set(CAPTION_KEYS) == SD_SCRIPTS_CAPTION_KEYS
    declared = {f.name: f for f in dataclasses.fields(CaptionKeys)}
    types = field_types(CaptionKeys)
    for cls in (DataConfig, dataset_file.SubsetSpec, CaptionOptions, *SUBSET_TABLES):
        assert set(CAPTION_KEYS) <= _names(cls), cls
        for klass in cls.__mro__:  # declared nowhere else: no written class in the chain but CaptionKeys has one
            written = getattr(sys.modules[klass.__module__], klass.__name__, None) is klass  # not unset_copy's
            if klass is not CaptionKeys and written and klass.__module__.startswith("library"):
                assert not _own_annotations(klass) & set(CAPTION_KEYS), klass
    data = {f.name: f for f in dataclasses.fields(DataConfig)}
    for key, f in declared.items():  # [data]: the declaration's default and --help line
        assert (data[key].default, data[key].metadata["help"]) == (f.default, f.metadata["help"])
    for table in SUBSET_TABLES:  # dataset TOML: the same key, unset by default, the same help
        fields = {f.name: f for f in dataclasses.fields(table)}
        table_types = field_types(table)
        for key, f in declared.items():
            assert fields[key].default is None and fields[key].metadata["help"] == f.metadata["help"]
            assert typing.get_args(table_types[key]) == (types[key], type(None))
    # The transforms' options: the caption keys and the run-wide techniques of [data], nothing else.
    assert _names(CaptionOptions) == set(CAPTION_KEYS) | RUN_WIDE
    assert RUN_WIDE <= _names(DataConfig) and not RUN_WIDE & _names(dataset_file.SubsetTable)


def _other(key: str):
    """A value of the key's type other than its default."""
    default = next(f.default for f in dataclasses.fields(CaptionKeys) if f.name == key)
    match default:
        case bool():
            return not default
        case int():
            return default + 2
        case float():
            return 0.5
        case str():
            return ".caption" if key == "caption_extension" else default + "|"


def _toml_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if not isinstance(v, str) else f'"{v}"'


def _subset_data(tmp_path, lines: str, **data):
    (tmp_path / "ds.toml").write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n'
                                      f'image_dir = "{resolve_dataset_ref("demo:red")}"\n{lines}')
    cfg = DataConfig(dataset_config=str(tmp_path / "ds.toml"), min_bucket_reso=64, max_bucket_reso=128,
                     num_workers=0, **data)
    cfg.validate()
    return build_train_data(cfg, default_resolution=64, seed=0)


@pytest.mark.parametrize("key", CAPTION_KEYS)
def test_a_subset_value_of_each_caption_key_reaches_the_caption_options(tmp_path, key):
    value = _other(key)
    data = _subset_data(tmp_path, f"{key} = {_toml_value(value)}\n")
    (options,) = data.loader.dataset.options  # one subset
    assert getattr(options, key) == value
    others = {k: v for k, v in dataclasses.asdict(options).items() if k in CAPTION_KEYS and k != key}
    assert others == {k: getattr(DataConfig(), k) for k in others}  # the rest fall back to [data]


@pytest.mark.parametrize("line, words", [
    ("caption_dropout_rate = 1.5", "caption_dropout_rate must be between 0 and 1 (got 1.5)"),
    ("keep_tokens = -1", "keep_tokens must not be negative (got -1)"),
])
def test_a_bad_subset_caption_value_names_the_file_subset_and_key(tmp_path, line, words):
    with pytest.raises(ConfigError) as err:
        _subset_data(tmp_path, line + "\n")
    assert str(err.value) == f"{tmp_path / 'ds.toml'}: dataset #1: subset red: {words}"


CAPTION = ", ".join(f"t{i}" for i in range(20))
ON = {"shuffle_caption": True, "caption_dropout_rate": 0.5, "caption_dropout_every_n_epochs": 2,
      "caption_tag_dropout_rate": 0.5, "multilevel_tag_dropout": True, "synonym_probability": 0.5}
SYNONYMS = {"t3": ("three",)}


def _captions(opts: CaptionOptions) -> set[str]:
    return {transform_caption(CAPTION, opts, random.Random(seed), epoch) for seed in range(20) for epoch in range(4)}


def test_varying_lists_exactly_the_options_that_change_a_caption():
    assert set(ON) == set(VARYING)
    for key, value in ON.items():  # each on its own changes the caption between seeds or epochs ...
        opts = CaptionOptions(synonyms=SYNONYMS, **{key: value})
        assert len(_captions(opts)) > 1, key
        assert varying_caption_keys(opts) == [key]
        assert len(_captions(without_varying(opts))) == 1  # ... and the validation captions turn it off
    fixed = {"keep_tokens": 2, "keep_tokens_separator": "|||", "caption_prefix": "p", "caption_suffix": "s",
             "secondary_separator": ";", "caption_separator": ",", "caption_extension": ".caption",
             "protected_tags": ("t1",), "tag_order": ("t5",), "synonyms": SYNONYMS}
    # caption_levels draws a level per image, which depends on the image's files: the loader checks it per image.
    assert set(fixed) | set(VARYING) | {"caption_levels"} == _names(CaptionOptions)
    assert len(_captions(CaptionOptions(**fixed))) == 1 and varying_caption_keys(CaptionOptions(**fixed)) == []


@pytest.mark.parametrize("key", VARYING)
def test_each_varying_option_is_refused_with_text_encoder_caching(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"data\.cache_text_encoder_outputs = true needs fixed captions, but "
                                          rf"data\.{key} change"):
        DataConfig(train_data_dir="demo:red", cache_text_encoder_outputs=True, **{key: ON[key]}).validate()
    # The same rule per subset, where the loader collects the captions to cache: a dataset TOML subset sets the
    # caption keys, [data] the run-wide techniques.
    if key in CAPTION_KEYS:
        data = _subset_data(tmp_path, f"{key} = {_toml_value(ON[key])}\n")
    else:
        data = _subset_data(tmp_path, "", **{key: ON[key]})
    with pytest.raises(ConfigError, match=rf"subset 'red' changes its captions while training \({key}\)"):
        data.fixed_captions()


@pytest.mark.parametrize("line", ["enable_wildcard = true", "token_warmup_min = 2", "token_warmup_step = 1.0"])
def test_sd_scripts_varying_options_sdtk_lacks_are_refused(tmp_path, line):
    """Why VARYING does not list them: they never reach training at any value but the neutral one."""
    key = line.split(" ")[0]
    with pytest.raises(ConfigError, match=rf"{key} = .* is an sd-scripts option sdtk does not implement"):
        _subset_data(tmp_path, line + "\n")
