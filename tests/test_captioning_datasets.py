"""caption_images.py on Hugging Face datasets (caption.dataset_path): a parquet file and an imagefolder made here get
their captions as columns of a captioned copy that the training loader reads; existing captions are kept; a killed
run continues where it stopped; a cut record line is dropped."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import caption_images
from caption_models import COLOURS, make_tiny_blip, make_tiny_tagger
from library.captioning.hfrows import read_records, record_path
from library.captioning.text import TextCaptioner
from library.config.caption import GenerateConfig
from library.config.data import DataConfig
from library.data.loader import build_train_data

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parent.parent
ROWS = ["red", "green", "blue", "white", "black"]
TAGS = {"red": "red_hair, ^_^, looking_at_viewer, hakurei_reimu", "blue": "blue_sky, ^_^, looking_at_viewer",
        "black": "^_^, looking_at_viewer"}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # each test converts into its own cache


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return make_tiny_tagger(tmp_path_factory.mktemp("tagger") / "wd14")


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), COLOURS[colour]).save(buf, "PNG")
    return buf.getvalue()


def make_parquet(path: Path, text: list) -> Path:
    images = [{"bytes": png(c), "path": None} for c in ROWS]  # datasets' Image feature layout
    pq.write_table(pa.table({"image": images, "text": text, "n": list(range(len(ROWS)))}), path)
    return path


def run(*args) -> int:
    return caption_images.main([str(a) for a in args] + ["--no-progress"])


def test_parquet_gets_a_caption_column_the_training_loader_reads(tmp_path, tagger, capsys):
    src = make_parquet(tmp_path / "d.parquet", ["", "my own caption", None, "", ""])
    out = tmp_path / "captioned"
    args = ["--caption.dataset_path", src, "--caption.output_dataset", out, "--mode", "tags", "--repo_id", tagger,
            "--batch_size", "2", "--caption.tagger.general_threshold", "0.4"]
    assert run(*args) == 0
    assert "5 rows in" in capsys.readouterr().out
    ds = datasets.load_from_disk(str(out))
    assert list(ds["n"]) == [0, 1, 2, 3, 4]  # the other columns come along
    expected = [TAGS["red"], "my own caption", TAGS["blue"],
                "red_hair, green_eyes, blue_sky, white_background, ^_^, looking_at_viewer", TAGS["black"]]
    expected[3] += ", hatsune_miku_(vocaloid), hakurei_reimu"
    assert list(ds["text"]) == expected
    data = build_train_data(DataConfig(dataset_path=str(out), resolution=64, batch_size=1, min_bucket_reso=64,
                                       max_bucket_reso=64, num_workers=0), default_resolution=64, seed=0)
    assert sorted(it.captions[0] for it in data.index.items) == sorted(expected)
    # a rerun has nothing to do and leaves the copy alone; --overwrite recaptions the filled row too
    mtime = (out / "dataset_info.json").stat().st_mtime_ns
    assert run(*args) == 0
    assert "0 captions to write, 5 already there and kept" in capsys.readouterr().out
    assert (out / "dataset_info.json").stat().st_mtime_ns == mtime
    assert run(*args, "--dry-run", "--caption.output_dataset", tmp_path / "other") == 0  # another record: none yet
    assert "4 captions to write, 1 already there" in capsys.readouterr().out and not (tmp_path / "other").exists()
    assert run(*args, "--overwrite") == 0
    assert "5 captions to write, 0 already there" in capsys.readouterr().out
    assert datasets.load_from_disk(str(out))["text"][1] == "green_eyes, ^_^, looking_at_viewer, hatsune_miku_(vocaloid)"


def test_imagefolder_levels_as_columns(tmp_path, tagger):
    blip = make_tiny_blip(tmp_path / "blip")
    src = tmp_path / "folder"
    src.mkdir()
    for c in ("red", "blue"):
        (src / f"{c}.png").write_bytes(png(c))
    (src / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{c}.png", "n": i}) + "\n"
                                                for i, c in enumerate(("red", "blue"))))
    out = tmp_path / "captioned"
    assert run("--caption.dataset_path", src, "--caption.output_dataset", out, "--mode", "levels", "--model", blip,
               "--repo_id", tagger, "--caption.short.max_new_tokens", "3", "--caption.detailed.max_new_tokens", "6",
               "--caption.detailed.min_new_tokens", "2") == 0
    ds = datasets.load_from_disk(str(out))
    assert list(ds["tags"]) == [TAGS["red"], TAGS["blue"]]
    direct = TextCaptioner(str(blip), dtype="fp32", device="cpu", keep_prompt=False)
    for i, c in enumerate(("red", "blue")):
        image = Image.new("RGB", (64, 64), COLOURS[c])
        assert ds["short"][i] == direct([image], GenerateConfig(max_new_tokens=3))[0]
        assert ds["detailed"][i] == direct([image], GenerateConfig(max_new_tokens=6, min_new_tokens=2))[0]
    data = build_train_data(DataConfig(dataset_path=str(out), caption_column="", resolution=64, batch_size=1,
                                       min_bucket_reso=64, max_bucket_reso=64, num_workers=0),
                            default_resolution=64, seed=0)
    assert sorted(it.levels["tags"][0] for it in data.index.items) == sorted([TAGS["red"], TAGS["blue"]])


def test_a_killed_dataset_run_continues_where_it_stopped(tmp_path, tagger, capsys):
    src = make_parquet(tmp_path / "d.parquet", [""] * len(ROWS))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    args = ["--caption.dataset_path", str(src), "--mode", "tags", "--repo_id", str(tagger), "--batch_size", "2",
            "--no-progress"]
    env = {**os.environ, "SDTK_TEST_KILL_AT": "caption:3", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "caption_images.py"), *args, "--caption.output_dataset",
                           str(killed)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not killed.exists()  # the copy is written at the end only
    assert sorted(read_records(record_path(killed))) == [("caption", 0), ("caption", 1)]  # the first batch
    assert caption_images.main([*args, "--caption.output_dataset", str(killed)]) == 0
    assert "3 captions to write, 2 already there" in capsys.readouterr().out
    assert caption_images.main([*args, "--caption.output_dataset", str(whole)]) == 0
    assert list(datasets.load_from_disk(str(killed))["text"]) == list(datasets.load_from_disk(str(whole))["text"])


def test_a_record_line_cut_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "out.captions.jsonl"
    path.write_text('{"row": 0, "level": "caption", "caption": "a"}\n{"row": 1, "level": "capt', encoding="utf-8")
    assert read_records(path) == {("caption", 0): "a"}
    assert path.read_text(encoding="utf-8") == '{"row": 0, "level": "caption", "caption": "a"}\n'


def test_dataset_errors_name_the_columns(tmp_path, tagger, capsys):
    src = make_parquet(tmp_path / "d.parquet", [""] * len(ROWS))
    base = ["--caption.dataset_path", src, "--caption.output_dataset", tmp_path / "o", "--mode", "tags",
            "--repo_id", tagger]
    assert run(*base, "--caption.image_column", "picture") == 2
    assert "image_column = 'picture' is not one of its columns; its columns are: image, text, n" in (
        capsys.readouterr().err)
    assert run(*base, "--caption.caption_column", "n") == 2
    assert "column 'n' of 5-row dataset holds" in capsys.readouterr().err
    assert run(tmp_path / "d.parquet", "--mode", "tags", "--repo_id", tagger) == 2
    assert "is a file: a dataset goes in caption.dataset_path" in capsys.readouterr().err
