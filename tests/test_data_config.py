"""[data] table and the sd-scripts dataset TOML (example verbatim from sd-scripts docs/config_README-en.md)."""


import pytest

from library.config.core import load_config
from library.config.data import DataConfig
from library.config.dataset_file import load_dataset_file, parse_dataset_dict, resolve_datasets
from library.errors import ConfigError

# sd-scripts docs/config_README-en.md, first example, verbatim.
SD_SCRIPTS_EXAMPLE = r"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'C:\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
  metadata_file = 'C:\piyo\piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""

# sd-scripts docs/config_README-en.md, multi-resolution example with skip_image_resolution, verbatim.
SD_SCRIPTS_MULTIRES = r"""
[general]
enable_bucket = true
bucket_no_upscale = true
max_bucket_reso = 1536

[[datasets]]
resolution = 768
  [[datasets.subsets]]
  image_dir = 'C:\hoge'

[[datasets]]
resolution = 1024
skip_image_resolution = 768
  [[datasets.subsets]]
  image_dir = 'C:\hoge'

[[datasets]]
resolution = 1280
skip_image_resolution = 1024
  [[datasets.subsets]]
  image_dir = 'C:\hoge'
"""


def test_sd_scripts_multires_example(tmp_path):
    f = tmp_path / "multi.toml"
    f.write_text(SD_SCRIPTS_MULTIRES, encoding="utf-8")
    specs = resolve_datasets(load_dataset_file(f), DataConfig(), 512, tmp_path)
    assert [(s.resolution, s.skip_image_resolution, s.max_bucket_reso, s.bucket_no_upscale) for s in specs] == [
        ((768, 768), 0, 1536, True), ((1024, 1024), 768, 1536, True), ((1280, 1280), 1024, 1536, True)]


def test_sd_scripts_example_fallbacks(tmp_path):
    f = tmp_path / "dataset.toml"
    f.write_text(SD_SCRIPTS_EXAMPLE, encoding="utf-8")
    df = load_dataset_file(f)
    base = DataConfig(caption_extension=".caption", flip_aug=True, batch_size=7)
    db, ft = resolve_datasets(df, base, 1024, tmp_path)
    assert (db.resolution, db.batch_size, ft.resolution, ft.batch_size) == ((512, 512), 4, (768, 768), 2)
    assert [s.keep_tokens for s in db.subsets] == [2, 3, 1] and ft.subsets[0].keep_tokens == 1
    assert [s.is_reg for s in db.subsets] == [False, False, True]
    assert [s.class_tokens for s in db.subsets] == ["hoge girl", "fuga boy", "human"]
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in db.subsets + ft.subsets)  # [general]
    assert all(s.flip_aug for s in db.subsets)  # not set in the file: falls back to [data]
    assert db.subsets[0].image_dir.endswith("C:\\hoge")  # TOML literal string kept as written
    assert ft.subsets[0].metadata_file.endswith("C:\\piyo\\piyo_md.json")
    assert db.enable_bucket is True and db.bucket_reso_steps == 64  # [data] defaults


@pytest.mark.parametrize("doc, words", [
    ({"datasets": [{"subsets": [{"image_dir": "a", "keep_tokenz": 1}]}]}, ["keep_tokenz", "keep_tokens"]),
    ({"general": {"image_dir": "x"}, "datasets": [{"subsets": [{"image_dir": "a"}]}]}, ["image_dir", "[general]"]),
    ({"datasets": [{"subsets": [{"image_dir": "a", "batch_size": 2}]}]}, ["batch_size"]),  # dataset key in a subset
    ({"datasets": [{"subsets": [{"image_dir": "a", "keep_tokens": "2"}]}]}, ["keep_tokens", "int"]),
    ({"datasets": [{"subsets": [{"image_dir": "a", "color_aug": True}]}]}, ["color_aug", "not implement"]),
    ({"datasets": [{"subsets": [{"class_tokens": "x"}]}]}, ["image_dir"]),
    ({"datasets": [{"resolution": 512}]}, ["no [[datasets.subsets]]"]),
    ({"general": {}}, ["no [[datasets]]"]),
    ({"datasets": [{"subsets": [{"image_dir": "a"}, {"image_dir": "b", "metadata_file": "m.json"}]}]}, ["mixes"]),
])
def test_dataset_file_errors_name_the_key(doc, words):
    with pytest.raises(ConfigError) as e:
        parse_dataset_dict(doc, "my.toml")
    assert "my.toml" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_neutral_unsupported_values_are_accepted():
    df = parse_dataset_dict({"general": {"color_aug": False, "cache_info": True},
                             "datasets": [{"subsets": [{"image_dir": "a", "token_warmup_min": 1}]}]}, "x.toml")
    assert df.datasets[0].subsets[0].image_dir == "a"


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset_file(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[general\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_dataset_file(tmp_path / "bad.toml")


def test_data_table_loads_and_validates():
    cfg = load_config(DataConfig, {"train_data_dir": "x", "resolution": [768, 512], "bucket_reso_steps": 32,
                                   "synonyms": {"1girl": ["one girl"]}, "bucket_mode": "sequence_length"})
    assert cfg.resolution == [768, 512] and cfg.synonyms == {"1girl": ["one girl"]}


@pytest.mark.parametrize("kw, words", [
    ({"cache_latents": True, "random_crop": True}, ["random_crop", "cache_latents"]),
    ({"bucket_reso_steps": 48}, ["bucket_reso_steps"]),
    ({"min_bucket_reso": 100}, ["min_bucket_reso", "bucket_reso_steps"]),
    ({"caption_dropout_rate": 1.5}, ["caption_dropout_rate"]),
    ({"batch_size": 0}, ["batch_size"]),
    ({"resolution": [512]}, ["resolution"]),
    ({"quality_percentiles": [10, 50], "quality_tag_names": ["a", "b"]}, ["quality_percentiles", "100"]),
    ({"quality_tag_names": ["a"]}, ["quality_tag_names"]),
    ({"cache_latents_to_disk": True}, ["cache_latents"]),
])
def test_data_validate_names_keys(kw, words):
    with pytest.raises(ConfigError) as e:
        DataConfig(**kw).validate()
    for w in words:
        assert w in str(e.value)
