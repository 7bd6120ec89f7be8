"""check_dataset.py on Hugging Face datasets (issue 18 deliverable 3): rows, columns, missing captions, the checks."""

import json

import numpy as np
import pytest

import check_dataset
from library.data.doctor_datasets import is_dataset, scan_dataset
from tests.test_data_hf import make_imagefolder, make_parquet, png_bytes

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def textured(seed: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.kron(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def planted_parquet(path):
    rows = [textured(1), textured(2), textured(1), b"not an image", b"", textured(3)]
    caps = ["a red thing", "a blue thing", "a red thing again", "broken", "empty", None]
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in rows], "text": caps,
                             "score": [1.0] * len(rows)}), path)
    return path


def test_rows_are_checked_like_files(tmp_path):
    report = scan_dataset(str(planted_parquet(tmp_path / "d.parquet")))
    kinds = {(f.kind, f.path) for f in report.findings}
    assert ("unreadable", "row 3") in kinds and ("zero_byte", "row 4") in kinds
    assert ("missing_caption", "row 5") in kinds and ("near_duplicate", "row 2") in kinds
    assert report.exit_code == 1 and report.n_image_files == 6 and len(report.images) == 4
    assert report.columns == ["image", "text", "score"]
    assert [i.caption for i in report.images] == ["a red thing", "a blue thing", "a red thing again", None]


def test_command_line_on_parquet_imagefolder_and_a_missing_column(tmp_path, capsys):
    out = tmp_path / "r.json"
    p = planted_parquet(tmp_path / "d.parquet")
    assert is_dataset(p) and check_dataset.main([str(p), "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "6 rows (4 readable images), 3 captioned; columns: image, text, score" in text
    assert "BLOCK     unreadable" in text
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["columns"] == ["image", "text", "score"] and data["counts"]["findings"]["missing_caption"] == 1

    imf = make_imagefolder(tmp_path / "imf")
    assert is_dataset(imf)
    assert check_dataset.main([str(imf), "--min-side", "16", "--max-aspect", "4", "--blur", "0", "--json",
                               str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [i["path"] for i in data["images"]] == [f"img{i}.png" for i in range(7)]
    assert data["counts"]["captioned"] == 7 and "missing_caption" not in data["counts"]["findings"]
    capsys.readouterr()

    q = make_parquet(tmp_path / "other.parquet", text_col="prompt")
    assert check_dataset.main([str(q)]) == 2
    err = capsys.readouterr().err
    assert "caption_column = 'text' is not one of its columns; its columns are: image, prompt" in err
    assert check_dataset.main([str(q), "--caption-column", "prompt", "--quick"]) == 0


def test_a_plain_folder_is_still_a_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(64, 64, 0))
    assert not is_dataset(tmp_path)


def test_quick_check_subsets_covers_folders_and_datasets_once_each(tmp_path):
    from library.config.data import DataConfig
    from library.data.dataset import dataset_specs
    from library.data.doctor_datasets import quick_check_subsets

    p = planted_parquet(tmp_path / "d.parquet")
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(64, 64, 0))
    (folder / "a.txt").write_text("a thing", encoding="utf-8")
    (folder / "b.png").write_bytes(b"")
    (tmp_path / "ds.toml").write_text(f'[[datasets]]\n[[datasets.subsets]]\ndataset_path = "{p}"\n'
                                      f'[[datasets.subsets]]\ndataset_path = "{p}"\nnum_repeats = 2\n'
                                      f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{folder}"\n')
    subsets = [s for spec in dataset_specs(DataConfig(dataset_config=str(tmp_path / "ds.toml")), 512)
               for s in spec.subsets]
    reports = quick_check_subsets(subsets)
    assert [r.quick for r in reports] == [True, True] and len(reports) == 2
    assert {(f.kind, f.path) for f in reports[0].blocking} == {("unreadable", "row 3"), ("zero_byte", "row 4")}
    assert [(f.kind, f.path) for f in reports[1].blocking] == [("zero_byte", "b.png")]
