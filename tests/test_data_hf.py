"""Hugging Face `datasets` datasets as training data (issue 18): parquet, imagefolder + metadata.jsonl, save_to_disk;
the same batches as a caption-file folder of the same images, bad rows, latent cache, resume, column errors."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.data import DataConfig
from library.config.dataset_file import parse_dataset_dict
from library.data.loader import build_train_data
from library.errors import ConfigError, DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

SIZES = [(64, 64), (96, 32), (32, 96), (64, 64), (96, 32), (80, 80), (64, 64)]  # three buckets at 64 px


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Each test converts into its own datasets cache (hfdata reads HF_DATASETS_CACHE at call time)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def png_bytes(w: int, h: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def captions() -> list[str]:
    return [f"thing {i}, tag{i}, common, extra{i % 3}" for i in range(len(SIZES))]


def make_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, ((w, h), cap) in enumerate(zip(SIZES, captions())):
        (root / f"img{i}.png").write_bytes(png_bytes(w, h, i))
        (root / f"img{i}.txt").write_text(cap, encoding="utf-8")
    return root


def make_parquet(path: Path, image_col: str = "image", text_col: str = "text", extra: dict | None = None) -> Path:
    # The layout of a hub parquet file: the image as a {bytes, path} struct, as datasets' Image feature stores it.
    images = [{"bytes": png_bytes(w, h, i), "path": None} for i, (w, h) in enumerate(SIZES)]
    pq.write_table(pa.table({image_col: images, text_col: captions(), **(extra or {})}), path)
    return path


def make_imagefolder(root: Path) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i, ((w, h), cap) in enumerate(zip(SIZES, captions())):
        (root / f"img{i}.png").write_bytes(png_bytes(w, h, i))
        rows.append({"file_name": f"img{i}.png", "text": cap})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return root


def cfg(**kw) -> DataConfig:
    base = dict(resolution=64, batch_size=2, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                num_workers=0, shuffle_caption=True, caption_tag_dropout_rate=0.2, flip_aug=True)
    base.update(kw)
    c = DataConfig(**base)
    c.validate()
    return c


def epochs(data, n: int = 2) -> list[dict]:
    out = []
    for e in range(n):
        data.set_epoch(e)
        out.extend(list(data))
    return out


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["captions"] == y["captions"]
        assert torch.equal(x["pixels"], y["pixels"])
        for k in ("original_sizes", "crop_top_lefts", "target_sizes", "loss_weights", "is_reg"):
            assert torch.equal(x[k], y[k]), k


def test_parquet_and_imagefolder_give_the_batches_of_a_caption_folder(tmp_path):
    folder = build_train_data(cfg(train_data_dir=str(make_folder(tmp_path / "folder"))), default_resolution=512,
                              seed=3)
    parquet = build_train_data(cfg(dataset_path=str(make_parquet(tmp_path / "d.parquet"))), default_resolution=512,
                               seed=3)
    imagefolder = build_train_data(cfg(dataset_path=str(make_imagefolder(tmp_path / "imf"))),
                                   default_resolution=512, seed=3)
    ref = epochs(folder)
    assert len({tuple(b["target_sizes"][0].tolist()) for b in ref}) == 3  # several buckets, captions transformed
    assert_same_batches(ref, epochs(parquet))
    assert_same_batches(ref, epochs(imagefolder))
    # parquet rows are read from the dataset (labelled by row), imagefolder rows are the files themselves
    assert [str(it.path) for it in parquet.index.items][:2] == [f"{tmp_path / 'd.parquet'}[0]",
                                                                f"{tmp_path / 'd.parquet'}[1]"]
    assert [it.path.name for it in imagefolder.index.items] == [f"img{i}.png" for i in range(len(SIZES))]
    assert parquet.summary()["datasets"][0]["is_dreambooth"] is False


def test_parquet_folder_and_save_to_disk_splits(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    make_parquet(d / "train-00000-of-00001.parquet")
    a = build_train_data(cfg(dataset_path=str(d)), default_resolution=512, seed=0)
    assert a.num_images == len(SIZES)

    ds = datasets.load_dataset("parquet", data_files={"train": str(d / "train-00000-of-00001.parquet")},
                               split="train", cache_dir=str(tmp_path / "c2"))
    dd = datasets.DatasetDict({"train": ds, "holdout": ds.select([0, 1])})
    dd.save_to_disk(str(tmp_path / "saved"))
    b = build_train_data(cfg(dataset_path=str(tmp_path / "saved"), dataset_split="holdout"), default_resolution=512,
                         seed=0)
    assert b.num_images == 2
    with pytest.raises(DataError, match=r"has no split 'test'; its splits: train, holdout \(set dataset_split\)"):
        build_train_data(cfg(dataset_path=str(tmp_path / "saved"), dataset_split="test"), default_resolution=512,
                         seed=0)
    with pytest.raises(DataError, match=r"Unknown split \"test\".*\(set dataset_split\)"):
        build_train_data(cfg(dataset_path=str(d), dataset_split="test"), default_resolution=512, seed=0)


def test_missing_columns_are_named_with_the_columns_there(tmp_path):
    p = make_parquet(tmp_path / "d.parquet", image_col="picture", text_col="prompt")
    with pytest.raises(DataError) as e:
        build_train_data(cfg(dataset_path=str(p)), default_resolution=512, seed=0)
    msg = str(e.value)
    assert "image_column = 'image' is not one of its columns" in msg
    assert "caption_column = 'text' is not one of its columns" in msg
    assert "its columns are: picture, prompt" in msg
    data = build_train_data(cfg(dataset_path=str(p), image_column="picture", caption_column="prompt"),
                            default_resolution=512, seed=0)
    assert data.index.items[0].captions == [captions()[0]]


def test_hub_id_without_the_hub_is_one_clear_error(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: what a user without network sees
    with pytest.raises(DataError, match=r"dataset 'someone/not-here' cannot be loaded .*needs the hub"):
        build_train_data(cfg(dataset_name="someone/not-here"), default_resolution=512, seed=0)


def test_bad_rows_are_skipped_and_listed_and_a_damaged_one_is_stood_in_for(tmp_path, capsys):
    good = [png_bytes(64, 64, i) for i in range(3)]
    damaged = bytearray(png_bytes(64, 64, 9))
    damaged[60:200] = bytes(140)  # header and IEND intact: only decoding the pixels fails
    rows = [{"bytes": b, "path": None} for b in good] + [{"bytes": b"not an image", "path": None},
                                                          {"bytes": None, "path": None},
                                                          {"bytes": bytes(damaged), "path": None}]
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": rows, "text": [f"c{i}" for i in range(6)]}), p)
    data = build_train_data(cfg(dataset_path=str(p), flip_aug=False, shuffle_caption=False,
                                caption_tag_dropout_rate=0.0), default_resolution=512, seed=0)
    err = capsys.readouterr().err
    assert f"{p}[3]: not a readable image" in err and f"{p}[4]: no image in column 'image'" in err
    assert data.num_images == 4
    batches = list(data)
    err = capsys.readouterr().err
    assert f"warning: skipped {p}[5] while training" in err and "d.parquet[" in err
    assert sum(len(b["captions"]) for b in batches) == 4 and "c5" not in sum((b["captions"] for b in batches), [])


def test_resume_part_way_gives_the_remaining_batches(tmp_path):
    c = cfg(dataset_path=str(make_parquet(tmp_path / "d.parquet")))
    full = build_train_data(c, default_resolution=512, seed=7)
    full.set_epoch(1)
    ref = list(full)
    again = build_train_data(c, default_resolution=512, seed=7)
    again.load_state_dict({"epoch": 1, "position": 2, "seed": 7, "steps_per_epoch": full.steps_per_epoch})
    again.set_epoch(1)
    assert_same_batches(ref[2:], list(again))


def test_latent_disk_cache_of_rows_is_reused_and_keyed_by_the_dataset(tmp_path):
    from test_data_cache import Counting, tiny_vae

    vae = tiny_vae(0)
    p = make_parquet(tmp_path / "d.parquet")
    c = cfg(dataset_path=str(p), cache_latents=True, cache_latents_to_disk=True, cache_dir=str(tmp_path / "lat"),
            vae_batch_size=4)
    first = Counting(vae)
    a = epochs(build_train_data(c, default_resolution=512, seed=0, vae=first), 1)
    assert first.calls == 6  # one VAE batch per bucket (3), and its mirror image (flip_aug)
    again = Counting(vae)
    b = epochs(build_train_data(c, default_resolution=512, seed=0, vae=again), 1)
    assert again.calls == 0
    assert all(torch.equal(x["latents"], y["latents"]) for x, y in zip(a, b))
    # a changed dataset (new file, new fingerprint) is not served the old latents
    make_parquet(p, extra={"note": ["x"] * len(SIZES)})
    changed = Counting(vae)
    build_train_data(c, default_resolution=512, seed=0, vae=changed)
    assert changed.calls == 6


def test_dataset_toml_subset_with_a_dataset_path(tmp_path):
    from library.config.dataset_file import resolve_datasets

    make_parquet(tmp_path / "d.parquet", text_col="prompt")
    raw = {"general": {"caption_column": "prompt"},
           "datasets": [{"resolution": 64, "subsets": [{"dataset_path": "d.parquet", "num_repeats": 2}]}]}
    specs = resolve_datasets(parse_dataset_dict(raw, "ds.toml"), DataConfig(), 512, tmp_path)
    s = specs[0].subsets[0]
    assert (s.dataset_path, s.caption_column, s.image_column, s.num_repeats, s.name) == (
        str(tmp_path / "d.parquet"), "prompt", "image", 2, "d.parquet")
    (tmp_path / "ds.toml").write_text('[general]\ncaption_column = "prompt"\n[[datasets]]\nresolution = 64\n'
                                      'min_bucket_reso = 32\nbucket_reso_steps = 32\n'
                                      '[[datasets.subsets]]\ndataset_path = "d.parquet"\nnum_repeats = 2\n')
    data = build_train_data(DataConfig(dataset_config=str(tmp_path / "ds.toml"), num_workers=0),
                            default_resolution=512, seed=0)
    assert data.num_images == len(SIZES) and len(data.sampler) > 0
    with pytest.raises(ConfigError, match="image_dir and dataset_path are different ways"):
        parse_dataset_dict({"datasets": [{"subsets": [{"dataset_path": "d.parquet", "image_dir": "x"}]}]}, "f")


def test_config_refuses_two_sources_and_metadata_with_a_dataset():
    with pytest.raises(ConfigError, match="train_data_dir and data.dataset_path are both set"):
        DataConfig(train_data_dir="x", dataset_path="y").validate()
    with pytest.raises(ConfigError, match="data.metadata_file is for image folders"):
        DataConfig(dataset_path="y", metadata_file="m.json").validate()


def test_imagefolder_with_metadata_csv_and_a_parquet_of_relative_paths(tmp_path):
    ref = epochs(build_train_data(cfg(train_data_dir=str(make_folder(tmp_path / "folder"))), default_resolution=512,
                                  seed=4))
    imf = make_imagefolder(tmp_path / "imf")
    (imf / "metadata.jsonl").unlink()
    lines = ["file_name,text"] + [f'img{i}.png,"{c}"' for i, c in enumerate(captions())]
    (imf / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert_same_batches(ref, epochs(build_train_data(cfg(dataset_path=str(imf)), default_resolution=512, seed=4)))
    # a path column: file names relative to the parquet file's folder
    pq.write_table(pa.table({"image": [f"imf/img{i}.png" for i in range(len(SIZES))], "text": captions()}),
                   tmp_path / "paths.parquet")
    data = build_train_data(cfg(dataset_path=str(tmp_path / "paths.parquet")), default_resolution=512, seed=4)
    assert data.index.items[0].path == tmp_path / "imf" / "img0.png" and data.index.items[0].source is None
    assert_same_batches(ref, epochs(data))


def test_dataloader_workers_read_rows_as_the_main_process_does(tmp_path):
    # data.num_workers defaults to 2: the rows' reader travels to the worker processes
    p = make_parquet(tmp_path / "d.parquet")
    ref = epochs(build_train_data(cfg(dataset_path=str(p)), default_resolution=512, seed=2))
    assert_same_batches(ref, epochs(build_train_data(cfg(dataset_path=str(p), num_workers=2), default_resolution=512,
                                                     seed=2)))


def test_an_image_folder_given_as_a_dataset_says_where_captions_come_from(tmp_path):
    folder = make_folder(tmp_path / "folder")  # .txt captions, no metadata.jsonl
    with pytest.raises(DataError, match=r"caption_column = 'text' is not one of its columns; its columns are: image"
                                        r".*; an imagefolder's captions come from its metadata.jsonl / metadata.csv, "
                                        r"and a folder of images with caption files belongs in data.train_data_dir"):
        build_train_data(cfg(dataset_path=str(folder)), default_resolution=512, seed=0)


def test_dataset_name_goes_through_load_dataset(tmp_path):
    # No hub here: load_dataset also takes a local repository folder for a name, which runs the dataset_name path
    # (load_dataset(name, split=..., cache_dir=...)) as a hub id would once downloaded.
    repo = tmp_path / "user" / "set"
    (repo / "data").mkdir(parents=True)
    make_parquet(repo / "data" / "train-00000-of-00001.parquet")
    ref = epochs(build_train_data(cfg(train_data_dir=str(make_folder(tmp_path / "folder"))), default_resolution=512,
                                  seed=6))
    data = build_train_data(cfg(dataset_name=str(repo)), default_resolution=512, seed=6)
    assert data.index.subsets[0].name == str(repo) and str(data.index.items[0].path) == f"{repo}[0]"
    assert_same_batches(ref, epochs(data))


def test_a_dataset_with_the_image_feature_written_by_datasets(tmp_path):
    # What datasets itself writes (Dataset.to_parquet / save_to_disk with features Image()): decode stays ours.
    from PIL import Image as PILImage

    images = [PILImage.open(io.BytesIO(png_bytes(w, h, i))) for i, (w, h) in enumerate(SIZES)]
    ds = datasets.Dataset.from_dict({"image": images, "text": captions()},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    ref = epochs(build_train_data(cfg(train_data_dir=str(make_folder(tmp_path / "folder"))), default_resolution=512,
                                  seed=8))
    for path in (tmp_path / "saved", tmp_path / "hf.parquet"):
        data = build_train_data(cfg(dataset_path=str(path)), default_resolution=512, seed=8)
        assert [it.header.size for it in data.index.items] == SIZES
        assert_same_batches(ref, epochs(data))


def test_folders_never_import_datasets(tmp_path):
    import subprocess
    import sys

    folder = make_folder(tmp_path / "folder")
    code = ("import sys; from library.config.data import DataConfig; from library.data.loader import build_train_data;"
            f"build_train_data(DataConfig(train_data_dir={str(folder)!r}, resolution=64, min_bucket_reso=32, "
            "bucket_reso_steps=32, num_workers=0), default_resolution=512, seed=0);"
            "import check_dataset; print(sorted(m for m in ('datasets', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
