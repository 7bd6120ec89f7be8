"""Latent cache: reuse without VAE calls, rebuild on VAE / resolution change, flips, masks, refusal of random_crop."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from library.config.data import DataConfig
from library.data.cache import encode_latents
from library.data.loader import build_latent_cache, build_train_data
from library.errors import ConfigError


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    blocks = 4
    return AutoencoderKL(block_out_channels=(16, 32, 32, 32), latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         norm_num_groups=8, sample_size=64).eval()


class Counting:
    """Wraps a VAE and counts encode() calls."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(0)


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 64), (64, 64), (96, 64)]):
        arr = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
        arr[..., 3] = 255
        arr[:, : w // 2, 3] = 0
        Image.fromarray(arr, "RGBA").save(d / f"i{i}.png")
        (d / f"i{i}.txt").write_text(f"cap {i}", encoding="utf-8")
    return d


def cfg(images, tmp_path, **kw):
    base = dict(train_data_dir=str(images), resolution=64, batch_size=2, min_bucket_reso=32, max_bucket_reso=128,
                bucket_reso_steps=32, cache_latents=True, cache_latents_to_disk=True,
                cache_dir=str(tmp_path / "cache"), num_workers=0, vae_batch_size=2)
    base.update(kw)
    return DataConfig(**base)


def test_disk_cache_reused_then_rebuilt_on_vae_or_resolution_change(images, tmp_path, vae, capsys):
    c = cfg(images, tmp_path)
    first = Counting(vae)
    data = build_train_data(c, default_resolution=512, seed=0, vae=first)
    assert first.calls == 2  # two buckets (64x64 x2 in one VAE batch, 96x64 -> its bucket alone)
    batches = list(data)
    assert all(b["latents"].shape[1] == 4 and "pixels" not in b for b in batches)
    assert {tuple(b["latents"].shape[-2:]) for b in batches} == {(8, 8)}

    again = Counting(vae)
    data2 = build_train_data(c, default_resolution=512, seed=0, vae=again)
    assert again.calls == 0  # everything reused from disk
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(batches, list(data2)))
    assert "3 reused, 0 to encode" in capsys.readouterr().err

    other = Counting(tiny_vae(1))
    build_train_data(c, default_resolution=512, seed=0, vae=other)
    assert other.calls == 2 and "3 VAE changed" in capsys.readouterr().err

    bigger = Counting(other.vae)
    data3 = build_train_data(cfg(images, tmp_path, resolution=128, max_bucket_reso=256), default_resolution=512,
                             seed=0, vae=bigger)
    assert "0 reused, 3 to encode" in capsys.readouterr().err  # new buckets: every image encoded again
    assert bigger.calls == 2  # 128x128 (x2, one VAE batch) and the 96x64 image's bucket
    assert {tuple(b["latents"].shape[-2:]) for b in data3} == {(16, 16), (12, 20)}


def test_touched_image_is_reencoded(images, tmp_path, vae, capsys):
    c = cfg(images, tmp_path)
    build_train_data(c, default_resolution=512, seed=0, vae=vae)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(images / "i0.png")  # new content, new size in bytes
    v = Counting(vae)
    build_train_data(c, default_resolution=512, seed=0, vae=v)
    assert v.calls == 1 and "1 image changed" in capsys.readouterr().err


def test_memory_cache_flip_and_masks(images, tmp_path, vae):
    c = cfg(images, tmp_path, cache_latents_to_disk=False, flip_aug=True, alpha_mask=True, batch_size=1)
    v = Counting(vae)
    data = build_train_data(c, default_resolution=512, seed=0, vae=v)
    assert v.calls == 4  # 2 VAE batches, each encoded plain and mirrored
    assert not (tmp_path / "cache").exists()
    flips = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        for b in data:
            m = b["masks"][0, 0]
            assert b["masks"].shape[-2:] == b["latents"].shape[-2:]
            flips.add(bool(m[:, -1].eq(0).all()))  # mirrored: the transparent half is on the right
    assert flips == {True, False}


@torch.no_grad()
def test_encode_latents_seeded_per_key_and_scaled(vae):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    a = encode_latents(vae, x, ["k", "j"])
    assert a.shape == (2, 4, 8, 8)
    assert torch.equal(a, encode_latents(vae, x, ["k", "j"]))  # same key, same sample
    assert torch.allclose(a[:1], encode_latents(vae, x[:1], ["k"]), atol=1e-5)  # same noise whatever the batch
    assert not torch.equal(a[:1], encode_latents(vae, x[:1], ["other"]))
    dist = vae.encode(x).latent_dist
    z = a / vae.config.scaling_factor  # no shift_factor on this VAE
    assert ((z - dist.mean) / dist.std).abs().max() < 6  # a posterior sample, not the mean


def test_random_crop_with_cache_is_refused(images, tmp_path, vae):
    with pytest.raises(ConfigError, match="random_crop.*cache_latents"):
        build_train_data(cfg(images, tmp_path, random_crop=True), default_resolution=512, seed=0, vae=vae)


def test_cache_only(images, tmp_path, vae):
    assert build_latent_cache(cfg(images, tmp_path), vae, default_resolution=512) == 3
    with pytest.raises(ConfigError, match="cache_latents_to_disk"):
        build_latent_cache(cfg(images, tmp_path, cache_latents_to_disk=False), vae, default_resolution=512)


def test_image_that_fails_to_decode_is_dropped_and_listed(images, tmp_path, vae, capsys):
    raw = bytearray((images / "i1.png").read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(64)  # damaged pixel data; header and end chunk intact, so indexing accepts it
    (images / "i1.png").write_bytes(bytes(raw))
    data = build_train_data(cfg(images, tmp_path, cache_latents_to_disk=False), default_resolution=512, seed=0,
                            vae=vae)
    assert data.num_images == 2
    assert sorted(c for b in data for c in b["captions"]) == ["cap 0", "cap 2"]
    err = capsys.readouterr().err
    assert "could not be decoded" in err and "i1.png" in err
