"""data.cache_text_encoder_outputs: which captions are cached, and the errors when captions change while training."""

import pytest

from library.config.data import DataConfig
from library.data.loader import build_train_data
from library.errors import ConfigError


def data_cfg(**kw) -> DataConfig:
    base = dict(train_data_dir="demo:shapes", resolution=64, batch_size=2, min_bucket_reso=64, max_bucket_reso=128,
                num_workers=0, cache_text_encoder_outputs=True)
    return DataConfig(**{**base, **kw})


def test_conflicting_caption_options_are_named():
    with pytest.raises(ConfigError, match=r"data\.shuffle_caption, data\.caption_dropout_rate"):
        data_cfg(shuffle_caption=True, caption_dropout_rate=0.1).validate()
    data_cfg().validate()


def test_fixed_captions_are_the_transformed_captions():
    data = build_train_data(data_cfg(caption_prefix="photo, "), default_resolution=64, seed=0)
    caps = data.fixed_captions()
    assert "photo, a red circle on a white background" in caps
    assert all(c.startswith("photo, ") for c in caps) and len(caps) == len(set(caps))
    assert len(caps) == len({it.captions[0] for it in data.index.items})


def test_live_captions_in_a_dataset_toml_subset_are_refused(tmp_path):
    from library.data.demo import resolve_dataset_ref

    (tmp_path / "ds.toml").write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n'
                                      f'image_dir = "{resolve_dataset_ref("demo:red")}"\nshuffle_caption = true\n')
    data = build_train_data(data_cfg(train_data_dir="", dataset_config=str(tmp_path / "ds.toml")),
                            default_resolution=64, seed=0)
    with pytest.raises(ConfigError, match="shuffle_caption"):
        data.fixed_captions()


def test_cache_only_writes_the_disk_cache_and_trains_nothing(tmp_path):
    from library.config.core import load_config
    from library.training.run import run_training
    from library.methods.lora import CONFIG_CLASS, make_method

    cfg = load_config(CONFIG_CLASS, {
        "data": {"train_data_dir": "demo:red", "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128,
                 "num_workers": 0, "cache_latents": True, "cache_latents_to_disk": True,
                 "cache_dir": str(tmp_path / "latents")},
        "save": {"output_dir": str(tmp_path / "out")}}, source="test")
    assert run_training(cfg, make_method(cfg), script="test", cache_only=True) is None
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == 15  # the 15 red demo images
    assert not (tmp_path / "out").exists()
