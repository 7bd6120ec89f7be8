"""Held-out validation (issue 21 item 8): the split (library/data/holdout.py), the fixed validation batches and the
seeded, batching-independent validation loss (library/training/validation.py)."""

from __future__ import annotations

import random

import pytest
import torch

from library.config.data import DataConfig
from library.config.diffusion import LossConfig, NoiseConfig
from library.data.holdout import split_validation
from library.data.loader import build_train_data
from library.diffusion import loss as L
from library.diffusion.noise import add_noise
from library.diffusion.objective import Objective
from library.errors import ConfigError
from library.training import validation as V

KEYS = [f"img{i:02d}.png" for i in range(10)]
BASE = dict(train_data_dir="demo:shapes", resolution=64, batch_size=2, min_bucket_reso=64, max_bucket_reso=128,
            num_workers=0)


def test_split_exact_values():
    assert split_validation(KEYS, 0.2, 0) == {"img07.png", "img09.png"}
    assert split_validation(KEYS, 0.2, 1) == {"img04.png", "img09.png"}  # the seed picks other images
    assert split_validation(list(reversed(KEYS)), 0.2, 0) == {"img07.png", "img09.png"}  # listing order is irrelevant
    assert split_validation(KEYS, 0.25, 0) == {"img02.png", "img07.png", "img09.png"}  # 2.5 rounds up
    assert split_validation(KEYS, 0.2, 0, salt="0:1") == {"img04.png", "img05.png"}  # another subset, another draw
    assert split_validation(KEYS, 0.0, 0) == set()
    assert split_validation(KEYS[:1], 0.5, 0) == set()  # a single image stays in training
    assert len(split_validation(KEYS[:3], 0.01, 0)) == 1  # at least one ...
    assert len(split_validation(KEYS[:3], 0.99, 0)) == 2  # ... and never all


def test_held_out_images_leave_training_and_captions_are_fixed():
    cfg = DataConfig(**BASE, validation_split=0.25, shuffle_caption=True, caption_dropout_rate=0.5,
                     caption_tag_dropout_rate=0.5, flip_aug=True, caption_prefix="photo, ")
    cfg.validate()
    data = build_train_data(cfg, default_resolution=64, seed=3)
    val = data.validation
    assert val.num_samples == 15 and data.num_images == 45 and data.steps_per_epoch == 23  # 60 demo images
    train_paths = {it.path for it in data.index.items}
    val_paths = {it.path for it in val.index.items}
    assert len(val_paths) == 15 and not train_paths & val_paths
    # The validation caption is the caption file with the prefix: no shuffle, no dropout, whatever the options say.
    for i, it in enumerate(val.index.items):
        assert val.captions_of[i] == "photo, " + it.captions[0]
    first = list(val.batches())
    again = list(val.batches())
    assert len(first) == 8 and [b["sample_ids"].tolist() for b in first] == [b["sample_ids"].tolist() for b in again]
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(first, again))
    assert [b["sample_ids"].tolist() for b in val.batches(max_batches=2)] == [[0, 1], [2, 3]]
    # Same seed, same split; the validation seed overrides train.seed.
    same = build_train_data(cfg, default_resolution=64, seed=3).validation
    assert {it.path for it in same.index.items} == val_paths
    other = DataConfig(**{**BASE, "validation_split": 0.25, "validation_seed": 3})
    moved = build_train_data(other, default_resolution=64, seed=99).validation
    assert {it.path for it in moved.index.items} == val_paths
    assert build_train_data(DataConfig(**BASE), default_resolution=64, seed=3).validation is None


def test_fixed_captions_include_the_validation_captions():
    """With cached text-encoder outputs the encoders leave the GPU after caching: validation captions go with them."""
    cfg = DataConfig(**BASE, validation_split=0.25, cache_text_encoder_outputs=True)
    data = build_train_data(cfg, default_resolution=64, seed=3)
    train_only = {it.captions[0] for it in data.index.items}
    assert set(data.validation.captions()) - train_only  # captions no training image has ...
    assert set(data.validation.captions()) | train_only == set(data.fixed_captions())  # ... are encoded too


def test_dataset_toml_keys_and_regularization_images(tmp_path):
    from library.data.demo import resolve_dataset_ref

    shapes = resolve_dataset_ref("demo:shapes")
    toml = tmp_path / "ds.toml"
    toml.write_text(f"""
[general]
resolution = 64
min_bucket_reso = 64
max_bucket_reso = 128
validation_seed = 7

[[datasets]]
validation_split = 0.1
[[datasets.subsets]]
image_dir = "{shapes}"
[[datasets.subsets]]
image_dir = "{shapes}"
is_reg = true
""")
    data = build_train_data(DataConfig(dataset_config=str(toml), num_workers=0), default_resolution=64, seed=0)
    val = data.validation
    assert val.num_samples == 6  # 10 % of the 60 training images; the regularization copies are never held out
    held = {it.path for it in val.index.items}
    # The held-out images are gone from the regularization subset too: no image is both trained on and validated on.
    assert not held & {it.path for it in data.index.items}
    assert sum(it.is_reg for it in data.index.items) == 54
    toml.write_text(toml.read_text().replace("validation_split = 0.1", "validation_split = 1.0"))
    with pytest.raises(ConfigError, match=r"validation_split = 1.0 .*must be at least 0 and below 1"):
        build_train_data(DataConfig(dataset_config=str(toml), num_workers=0), default_resolution=64, seed=0)


def test_config_checks():
    with pytest.raises(ConfigError, match=r"^data\.validation_split must be at least 0 and below 1 \(got 1\.0\)$"):
        DataConfig(**BASE, validation_split=1.0).validate()
    from library.config.train import TrainConfig

    with pytest.raises(ConfigError, match="validate_every_n_steps, validate_every_n_epochs and max_validation_steps"):
        TrainConfig(validate_every_n_steps=-1).validate()


def test_validation_due():
    assert [s for s in range(1, 9) if V.validation_due(s, False, 0, 3, 0)] == [3, 6]
    assert V.validation_due(4, True, 1, 0, 2) and not V.validation_due(2, True, 0, 0, 2)
    assert V.validation_due(5, True, 0, 0, 0) and not V.validation_due(5, False, 0, 0, 0)  # default: epoch ends


def test_timesteps_and_seeds():
    assert V.validation_timesteps(0, 1000) == [125, 375, 625, 875]
    assert V.validation_timesteps(100, 900) == [200, 400, 600, 800]
    assert V.validation_timesteps(0, 3) == [0, 1, 2]
    assert V.noise_seed(0, 1, 2) == 7534176613874648772  # sha256-derived: the same on every machine and run
    assert V.noise_seed(0, 1, 2) != V.noise_seed(0, 2, 1)


def fake_batches(latents: torch.Tensor, size: int) -> list[dict]:
    n = len(latents)
    return [{"latents": latents[i:i + size], "sample_ids": torch.arange(i, min(n, i + size)),
             "loss_weights": torch.ones(min(n, i + size) - i), "masks": None} for i in range(0, n, size)]


def test_validation_loss_exact_and_independent_of_batching():
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = Objective(NoiseConfig(), LossConfig(), "epsilon", native_resolution=64)
    calls = []

    def zero(batch, noisy, timesteps):
        calls.append(timesteps.tolist())
        return torch.zeros_like(noisy)

    torch.manual_seed(123)
    state, py_state = torch.get_rng_state(), random.getstate()
    result = V.validation_loss(fake_batches(latents, 2), zero, eps, seed=4)
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state  # no global draws
    assert calls[:4] == [[125, 125], [375, 375], [625, 625], [875, 875]]
    # Epsilon target with a zero prediction: the loss is the mean square of each sample's seeded noise.
    expected = {}
    for level, t in enumerate([125, 375, 625, 875]):
        sq = [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(V.noise_seed(4, i, level))).pow(2).mean()
              for i in range(5)]
        expected[t] = float(torch.stack(sq).double().mean())
    assert result.samples == 5
    assert result.per_timestep == pytest.approx(expected, rel=1e-6)
    assert result.loss == pytest.approx(sum(expected.values()) / 4, rel=1e-6)
    one = V.validation_loss(fake_batches(latents, 1), zero, eps, seed=4)
    assert one.loss == pytest.approx(result.loss, rel=1e-6)  # the batching does not change the figure
    assert V.validation_loss(fake_batches(latents, 2), zero, eps, seed=5).loss != result.loss
    assert V.validation_loss(fake_batches(latents, 2), zero, eps, seed=4, device="cpu") == result
    assert V.validation_loss([], zero, eps, seed=4).samples == 0


def test_prepare_at_matches_the_objective_targets():
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 500, 990])
    v = Objective(NoiseConfig(), LossConfig(), "v_prediction", native_resolution=64)
    p = V.prepare_at(v, latents, t, noise)
    assert torch.equal(p.noisy_latents, add_noise(latents, noise, t, v.alphas_cumprod))
    assert torch.equal(p.target, L.v_target(latents, noise, v.alphas_cumprod[t]))
    assert torch.equal(p.snr, v.snr_table[t].float())
    flow = Objective(NoiseConfig(timestep_sampling="logit_normal"), LossConfig(), "flow", native_resolution=64)
    p = V.prepare_at(flow, latents, torch.tensor([250, 500, 1000]), noise)
    tt = torch.tensor([0.25, 0.5, 1.0]).view(-1, 1, 1, 1)
    assert torch.allclose(p.noisy_latents, (1 - tt) * latents + tt * noise) and torch.equal(p.target, noise - latents)
    r = V.validation_loss(fake_batches(latents, 3), lambda b, x, ts: torch.zeros_like(x), flow, seed=0)
    assert sorted(r.per_timestep) == [126, 376, 626, 876]  # the model's flow timesteps k = t + 1


@pytest.mark.slow  # three short tiny-model runs (~30-60 s on 2 shared cores)
def test_validation_loss_is_logged_and_resume_exact(tmp_path):
    from tests.tinyrun import train_in_process, write_config

    tables = dict(data={"validation_split": 0.2, "max_bucket_reso": 64},
                  train={"max_train_steps": 4, "validate_every_n_steps": 2, "max_validation_steps": 2},
                  save={"save_every_n_steps": 2})
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora", **tables)
    whole = train_in_process("lora", cfg)
    assert sorted(whole.validation) == [2, 4]  # TrainResult.validation: {step: loss/validation}
    assert all(v == v and v > 0 for v in whole.validation.values())
    cut = write_config(tmp_path / "cut.toml", tmp_path / "cut", "lora", **{**tables, "train": {**tables["train"],
                                                                                              "max_train_steps": 2}})
    train_in_process("lora", cut)
    resumed = train_in_process("lora", cut, train={"max_train_steps": 4, "resume": "auto"})
    assert resumed.validation[4] == whole.validation[4]  # exactly: same weights, same batches, same noise


def test_cached_latents_are_split_with_their_images(tmp_path):
    from library.models.tiny import build_tiny

    vae = build_tiny("sd1").vae
    cfg = DataConfig(**BASE, validation_split=0.1, cache_latents=True)
    data = build_train_data(cfg, default_resolution=64, seed=0, vae=vae)
    batch = next(iter(data.validation))
    assert batch["latents"].shape == (2, 4, 8, 8) and "pixels" not in batch
    # Each held-out latent is its own image's (the store was re-indexed with the items).
    ids = batch["sample_ids"].tolist()
    plain = build_train_data(DataConfig(**BASE, cache_latents=True), default_resolution=64, seed=0, vae=vae)
    where = {it.path: ii for ii, it in enumerate(plain.index.items)}
    for row, i in enumerate(ids):
        ii = where[data.validation.index.items[i].path]
        assert torch.equal(batch["latents"][row], plain.loader.dataset.store.get(ii, False)[0])
