"""Indexing folders / metadata, bad files, captions, regularization balance, masks, flips and TrainData resume."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.data import DataConfig
from library.data.dataset import ImageItem, balance_regularization, dataset_specs, index_datasets
from library.data.images import ImageHeader, load_image, read_header
from library.data.loader import build_train_data
from library.errors import ConfigError, DataError


def png(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return path


def cfg(root, **kw) -> DataConfig:
    base = dict(train_data_dir=str(root), resolution=64, batch_size=2, min_bucket_reso=32, max_bucket_reso=128,
                bucket_reso_steps=32, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "data" / "3_sks dog"
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 96), (80, 80)]):
        png(d / f"img{i}.png", w, h, seed=i)
    for i in range(3):
        (d / f"img{i}.txt").write_text(f"sks dog, tag{i}, common\n", encoding="utf-8")
    return tmp_path / "data"


def test_repeats_folder_class_tokens_and_one_missing_caption_warning(folder, capsys):
    index = index_datasets(dataset_specs(cfg(folder), 512), cfg(folder))
    assert [it.path.name for it in index.items] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert all(it.repeats == 3 for it in index.items)
    assert index.items[3].captions == ["sks dog"]  # no caption file -> class tokens from "3_sks dog"
    assert index.items[0].captions == ["sks dog, tag0, common"]
    err = capsys.readouterr().err
    assert err.count("have no caption file") == 1 and "img3.png" in err


def test_plain_folder_uses_num_repeats_and_empty_caption(tmp_path, capsys):
    png(tmp_path / "a.png", 64, 64)
    index = index_datasets(dataset_specs(cfg(tmp_path, num_repeats=2), 512), cfg(tmp_path))
    assert index.items[0].repeats == 2 and index.items[0].captions == []


def test_bad_files_are_skipped_and_listed(folder, capsys):
    d = folder / "3_sks dog"
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image", encoding="utf-8")
    data = png(d / "cut.png", 64, 64, seed=9).read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "cut.jpg", quality=90)
    jpg = (d / "cut.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(jpg[: len(jpg) - 40])
    (d / "anim.gif").write_bytes(b"GIF89a")
    (d / "notes.json").write_text("{}", encoding="utf-8")  # a sidecar: not listed
    index = index_datasets(dataset_specs(cfg(folder), 512), cfg(folder))
    reasons = {p.name: why for p, why in index.skipped}
    assert set(reasons) == {"empty.png", "text.png", "cut.png", "cut.jpg", "anim.gif"}
    assert reasons["anim.gif"] == "not a supported image type (.gif)"
    assert "0 bytes" in reasons["empty.png"] and "truncated" in reasons["cut.png"] and "truncated" in reasons["cut.jpg"]
    assert len(index.items) == 4
    err = capsys.readouterr().err
    assert "skipped 5 unusable image file(s)" in err and "cut.jpg" in err


def test_folder_without_usable_images_is_an_error(tmp_path):
    (tmp_path / "1_x").mkdir()
    (tmp_path / "1_x" / "junk.png").write_bytes(b"")
    with pytest.raises(DataError, match="1_x: no usable images"):
        index_datasets(dataset_specs(cfg(tmp_path), 512), cfg(tmp_path))
    with pytest.raises(DataError, match="not found"):
        dataset_specs(cfg(tmp_path / "missing"), 512)


def test_non_utf8_caption_names_the_file(tmp_path):
    png(tmp_path / "a.png", 64, 64)
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"a\.txt is not UTF-8"):
        index_datasets(dataset_specs(cfg(tmp_path), 512), cfg(tmp_path))


def test_exif_orientation_swaps_size(tmp_path):
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert read_header(tmp_path / "r.jpg").size == (20, 40)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def _items(repeats: list[int], is_reg: bool) -> list[ImageItem]:
    h = ImageHeader((64, 64), 0, 1, False)
    return [ImageItem(Path(f"{i}.png"), [], h, 0, 0, is_reg, r) for i, r in enumerate(repeats)]


def test_regularization_balance_like_sd_scripts():
    # 2 train images x 3 repeats = 6; 4 reg images: first pass 4, then +1 to reg0 and reg1
    used = balance_regularization(_items([3, 3], False), _items([1, 1, 1, 1], True))
    assert [it.repeats for it in used] == [2, 2, 1, 1]
    # more reg images than needed: taken in order until the 2 training repeats are matched
    assert [it.repeats for it in balance_regularization(_items([2], False), _items([1, 1, 1], True))] == [1, 1]
    assert balance_regularization(_items([2], False), []) == []


def test_reg_folder_weights_and_flags(folder, tmp_path):
    png(tmp_path / "reg" / "1_dog" / "r0.png", 64, 64)
    data = build_train_data(cfg(folder, reg_data_dir=str(tmp_path / "reg"), prior_loss_weight=0.25),
                            default_resolution=512, seed=0)
    # 12 train + 12 reg samples; bucket 32x96 holds img2 (3 samples -> 2 batches), 64x64 the other 21 (-> 11)
    assert data.num_images == 5 and data.steps_per_epoch == 13
    rows = [(w, r) for b in data for w, r in zip(b["loss_weights"].tolist(), b["is_reg"].tolist())]
    assert sorted(set(rows)) == [(0.25, True), (1.0, False)] and len(rows) == 24
    ds = data.summary()["datasets"][0]
    assert (ds["num_train_images"], ds["num_reg_images"]) == (12, 12)
    assert data.tag_frequency()["3_sks dog"] == {"sks dog": 4, "common": 3, "tag0": 1, "tag1": 1, "tag2": 1}


def test_metadata_jsonl_scores_and_quality_tags(tmp_path):
    for i in range(4):
        png(tmp_path / f"m{i}.png", 64, 64, seed=i)
    lines = [{"path": f"m{i}.png", "caption": f"cap{i}", "tags": ["x", "y"], "score": float(i)} for i in range(4)]
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in lines), encoding="utf-8")
    c = cfg(tmp_path, metadata_file=str(tmp_path / "meta.jsonl"), quality_tags=True)
    index = index_datasets(dataset_specs(c, 512), c)
    assert [it.captions for it in index.items] == [[f"cap{i}, x, y"] for i in range(4)]
    # ranks 25, 50, 75, 100 % -> average, average, good, masterpiece
    assert [it.quality_tag for it in index.items] == ["average quality", "average quality", "good quality",
                                                      "masterpiece"]


def test_metadata_sd_scripts_json_without_extension(tmp_path):
    png(tmp_path / "img" / "a.png", 64, 64)
    (tmp_path / "md.json").write_text(json.dumps({"a": {"caption": "hello", "tags": "t1, t2"}, "gone": {}}))
    c = cfg(tmp_path / "img", metadata_file=str(tmp_path / "md.json"))
    index = index_datasets(dataset_specs(c, 512), c)
    assert [it.captions for it in index.items] == [["hello, t1, t2"]]
    assert [why for _, why in index.skipped] == ["listed in md.json but not found"]


def test_alpha_mask_at_latent_size_and_flip_crop(tmp_path):
    arr = np.full((64, 128, 4), 255, np.uint8)
    arr[:, :64, 3] = 0  # left half transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    c = cfg(tmp_path, alpha_mask=True, flip_aug=True, batch_size=1, resolution=[128, 64], max_bucket_reso=256)
    data = build_train_data(c, default_resolution=512, seed=0)
    seen = set()
    for epoch in range(8):
        data.set_epoch(epoch)
        (b,) = list(data)
        m = b["masks"][0, 0]
        assert b["masks"].shape == (1, 1, 8, 16) and b["pixels"].shape == (1, 3, 64, 128)
        flipped = bool(m[:, 0].eq(1).all())
        assert m[:, :8].eq(0 if not flipped else 1).all() and m[:, 8:].eq(1 if not flipped else 0).all()
        seen.add(flipped)
        assert b["original_sizes"].tolist() == [[64, 128]] and b["target_sizes"].tolist() == [[64, 128]]
    assert seen == {True, False}


def test_trainstate_resume_gives_identical_batches(folder):
    c = cfg(folder, shuffle_caption=True, caption_tag_dropout_rate=0.3, flip_aug=True, random_crop=True)
    ref = build_train_data(c, default_resolution=512, seed=5)
    ref.set_epoch(1)
    expected = list(ref)
    assert len(expected) == ref.steps_per_epoch == 7  # 64x64: 9 samples -> 5 batches, 32x96: 3 -> 2
    for k in (0, 3, 6):
        d = build_train_data(c, default_resolution=512, seed=5)
        d.set_epoch(1)
        it = iter(d)
        for _ in range(k):
            next(it)
        state = d.state_dict()
        assert (state["epoch"], state["position"]) == (1, k)
        resumed = build_train_data(c, default_resolution=512, seed=5)
        resumed.load_state_dict(state)
        got = list(resumed)
        assert [b["captions"] for b in got] == [b["captions"] for b in expected[k:]]
        assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(got, expected[k:]))
        assert all(torch.equal(a["crop_top_lefts"], b["crop_top_lefts"]) for a, b in zip(got, expected[k:]))


def test_workers_give_the_same_batches(folder):
    c0 = cfg(folder, shuffle_caption=True, flip_aug=True)
    a = list(build_train_data(c0, default_resolution=512, seed=1))
    b = list(build_train_data(cfg(folder, shuffle_caption=True, flip_aug=True, num_workers=2),
                              default_resolution=512, seed=1))
    assert [x["captions"] for x in a] == [x["captions"] for x in b]
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(a, b))


def test_sequence_length_mode_sizes_batches_per_bucket(tmp_path):
    for i in range(6):
        png(tmp_path / f"s{i}.png", 32, 32, seed=i)  # bucket 32x32: 16 tokens
    for i in range(2):
        png(tmp_path / f"b{i}.png", 64, 64, seed=i)  # bucket 64x64: 64 tokens
    c = cfg(tmp_path, bucket_mode="sequence_length", tokens_per_batch=64, bucket_no_upscale=True)
    data = build_train_data(c, default_resolution=512, seed=0)
    sizes = sorted((b["pixels"].shape[-1], len(b["captions"])) for b in data)
    assert sizes == [(32, 2), (32, 4), (64, 1), (64, 1)]  # 64 // 16 = 4 small per batch, 64 // 64 = 1 large


def test_skip_image_resolution_leaves_small_images_out(tmp_path, capsys):
    png(tmp_path / "small.png", 40, 40)
    png(tmp_path / "big.png", 64, 64)
    c = cfg(tmp_path, skip_image_resolution=48)
    index = index_datasets(dataset_specs(c, 512), c)
    assert [it.path.name for it in index.items] == ["big.png"]
    assert "1 image(s)" in capsys.readouterr().err


def test_demo_dataset_reference():
    data = build_train_data(DataConfig(train_data_dir="demo:shapes", resolution=64, min_bucket_reso=64,
                                       max_bucket_reso=128, num_workers=0), default_resolution=512, seed=0)
    batch = next(iter(data))
    assert data.num_images > 0 and batch["pixels"].shape[-2:] == (64, 64) and batch["captions"][0]


def test_dataset_toml_end_to_end_two_datasets(tmp_path, capsys):
    for i in range(3):
        png(tmp_path / "a" / f"a{i}.png", 64, 64, seed=i)
        (tmp_path / "a" / f"a{i}.txt").write_text("alpha, x", encoding="utf-8")
        png(tmp_path / "b" / f"b{i}.png", 64, 64, seed=10 + i)
    (tmp_path / "ds.toml").write_text(
        "[general]\nmin_bucket_reso = 32\nbucket_reso_steps = 32\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 3\n  [[datasets.subsets]]\n  image_dir = 'a'\n  num_repeats = 2\n"
        "[[datasets]]\nresolution = 128\nbatch_size = 1\n  [[datasets.subsets]]\n  image_dir = 'b'\n"
        "  class_tokens = 'beta'\n", encoding="utf-8")
    c = DataConfig(dataset_config=str(tmp_path / "ds.toml"), train_data_dir="ignored", num_workers=0)
    data = build_train_data(c, default_resolution=512, seed=0)
    assert "train_data_dir ignored" in capsys.readouterr().err
    shapes = sorted((tuple(b["pixels"].shape), tuple(b["captions"])) for b in data)
    assert shapes == [((1, 3, 128, 128), ("beta",))] * 3 + [((3, 3, 64, 64), ("alpha, x",) * 3)] * 2
    assert data.tag_frequency() == {"a": {"alpha": 3, "x": 3}, "b": {"beta": 3}}


def test_max_bucket_reso_below_resolution_is_refused(tmp_path):
    png(tmp_path / "a.png", 64, 64)
    with pytest.raises(ConfigError, match="max_bucket_reso"):
        dataset_specs(cfg(tmp_path, resolution=256, max_bucket_reso=128), 512)


def test_ranks_see_disjoint_samples_and_epochs_differ(folder):
    c = cfg(folder, shuffle_caption=True, batch_size=1)
    ranks = [build_train_data(c, default_resolution=512, seed=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 6  # 12 samples, batch 1, 2 ranks
    seen = [[(b["captions"][0], b["pixels"].sum().item()) for b in r] for r in ranks]
    # together the two ranks see every sample exactly once (multiset of images equals the 1-rank epoch)
    assert sorted(p for s in seen for _, p in s) == sorted(
        b["pixels"].sum().item() for b in build_train_data(cfg(folder, batch_size=1), default_resolution=512, seed=2))
    one = ranks[0]
    one.set_epoch(1)
    assert [b["captions"] for b in one] != [[c] for c, _ in seen[0]]


def test_trailing_data_after_jpeg_is_not_truncation_and_16bit_png_loads(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / "motion.jpg")
    with open(tmp_path / "motion.jpg", "ab") as f:
        f.write(b"\0\0\0\x18ftypmp42" * 1000)  # a phone "motion photo" appends a video after the JPEG
    assert read_header(tmp_path / "motion.jpg").size == (32, 32)
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "RGB" and np.asarray(img).min() == 255
