"""The native side of each model (issue 21 item 4): SD2-base (epsilon, 512) is no longer trained at 768."""

from __future__ import annotations

import json

import pytest

from library.models.configs import bundled_config_dir
from library.models.families import native_resolution, native_resolution_of_folder


def test_native_resolution_from_the_unet_sample_size():
    assert native_resolution("sd1", "epsilon", 64) == 512
    assert native_resolution("sd2", "epsilon", 64) == 512  # stable-diffusion-2-base
    assert native_resolution("sd2", "v_prediction", 96) == 768  # stable-diffusion-2-1 (768-v)
    assert native_resolution("sd2", "v_prediction", 64) == 512  # the config wins over the prediction type
    assert native_resolution("sdxl", "epsilon", 128) == 1024
    assert native_resolution("sd1", "epsilon", (96, 64)) == 768  # diffusers allows (height, width)
    assert native_resolution("sd1", "epsilon", 64, vae_scale_factor=4) == 256
    assert native_resolution("sd1", "epsilon", 8) == 64  # a tiny test model generates 64 px by default


def test_native_resolution_without_a_config_follows_the_family_and_prediction():
    assert native_resolution("sd1", "epsilon") == 512
    assert native_resolution("sd1", "v_prediction") == 512
    assert native_resolution("sd2", "epsilon") == 512
    assert native_resolution("sd2", "v_prediction", None) == 768
    assert native_resolution("sd2", "v_prediction", 0) == 768
    assert native_resolution("sdxl", "v_prediction") == 1024


def test_native_resolution_of_bundled_folders(tmp_path):
    assert native_resolution_of_folder("sd1", bundled_config_dir("sd15")) == 512
    assert native_resolution_of_folder("sd2", bundled_config_dir("sd21_base")) == 512
    assert native_resolution_of_folder("sd2", bundled_config_dir("sd21")) == 768
    assert native_resolution_of_folder("sdxl", bundled_config_dir("sdxl")) == 1024
    # Facts missing from a folder fall back to the rule: here only the scheduler says v -> 768.
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert native_resolution_of_folder("sd2", tmp_path) == 768
    assert native_resolution_of_folder("sd2", tmp_path / "missing") == 512
    assert native_resolution_of_folder("sd2", None) == 512


def test_estimate_of_sd2_base_runs_at_512():
    from library.config.data import DataConfig
    from library.config.optim import OptimizerConfig
    from library.config.train import TrainConfig
    from library.estimate.report import spec_from_sections

    base = spec_from_sections("lora", "sd2", bundled_config_dir("sd21_base"), TrainConfig(), OptimizerConfig(),
                              DataConfig())
    v = spec_from_sections("lora", "sd2", bundled_config_dir("sd21"), TrainConfig(), OptimizerConfig(), DataConfig())
    assert base.resolution == (512, 512) and v.resolution == (768, 768)


@pytest.mark.slow  # one step at 512 px: 30-70 s on 2 shared cores
def test_sd2_base_trains_at_512_with_resolution_0(tmp_path):
    from safetensors import safe_open

    from library.models.save import save_diffusers
    from library.models.tiny import build_tiny
    from tests.tinyrun import train_in_process, write_config

    model = build_tiny("sd2", prediction_type="epsilon")
    model.unet.register_to_config(sample_size=64)  # as stabilityai/stable-diffusion-2-base's UNet config says
    folder = save_diffusers(model, tmp_path / "sd2base")
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora",
                       model={"pretrained_model_name_or_path": str(folder)},
                       data={"resolution": 0, "batch_size": 1, "min_bucket_reso": 256, "max_bucket_reso": 1024},
                       train={"max_train_steps": 1})
    result = train_in_process("lora", cfg)
    with safe_open(str(result.result_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_resolution"] == "(512, 512)" and meta["modelspec.resolution"] == "512x512"
    (dataset,) = json.loads(meta["ss_datasets"])
    assert dataset["resolution"] == [512, 512]
    assert set(dataset["bucket_info"]["buckets"]) <= {"512x512", "448x576", "576x448", "384x640", "640x384"}
