"""The demo dataset: deterministic bytes, sizes, captions, colour dominance, cache resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data import demo
from library.errors import DataError


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return demo.make_demo_dataset(tmp_path_factory.mktemp("shapes"), "shapes", seed=0)


def _files(folder: Path, ext: str) -> list[Path]:
    return sorted(folder.glob(f"*{ext}"))


def test_same_seed_gives_identical_bytes(shapes_dir, tmp_path):
    again = demo.make_demo_dataset(tmp_path / "again", "shapes", seed=0)
    a, b = _files(shapes_dir, ".png"), _files(again, ".png")
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_other_seed_moves_the_shapes(shapes_dir, tmp_path):
    other = demo.make_demo_dataset(tmp_path / "other", "shapes", seed=1)
    differ = sum(x.read_bytes() != y.read_bytes()
                 for x, y in zip(_files(shapes_dir, ".png"), _files(other, ".png")))
    assert differ == 60


def test_shapes_variant_counts_sizes_and_captions(shapes_dir):
    pngs = _files(shapes_dir, ".png")
    assert len(pngs) == 60
    sizes = {}
    for p in pngs:
        with Image.open(p) as im:
            assert im.mode == "RGB"
            sizes[im.size] = sizes.get(im.size, 0) + 1
    assert sizes == {(96, 96): 20, (128, 96): 20, (96, 128): 20}
    assert (shapes_dir / "red_circle_white.txt").read_text(encoding="utf-8") == "a red circle on a white background\n"
    assert (shapes_dir / "yellow_star_darkgray.txt").read_text(encoding="utf-8") == \
        "a yellow star on a dark gray background\n"
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in pngs]
    for colour in ("red", "green", "blue", "yellow"):
        assert sum(c.startswith(f"a {colour} ") for c in captions) == 15
    for shape in demo.SHAPES:
        assert sum(f" {shape} on a " in c for c in captions) == 12


def test_colour_dominates_each_image(shapes_dir):
    """Mean channels: the shape colour wins by a clear margin (the neutral background adds equally to each)."""
    for p in _files(shapes_dir, ".png"):
        r, g, b = np.asarray(Image.open(p), dtype=np.float64).reshape(-1, 3).mean(0)
        match p.name.split("_")[0]:
            case "red":
                assert r > max(g, b) + 20, p.name
            case "green":
                assert g > max(r, b) + 15, p.name
            case "blue":
                assert b > max(r, g) + 20, p.name
            case "yellow":
                assert min(r, g) > b + 25, p.name
            case other:
                raise AssertionError(other)


def test_red_variant_is_the_red_subset_without_the_colour_word(shapes_dir, tmp_path):
    red = demo.make_demo_dataset(tmp_path / "red", "red", seed=0)
    pngs = _files(red, ".png")
    assert len(pngs) == 15
    for p in pngs:
        assert p.read_bytes() == (shapes_dir / p.name).read_bytes()
        caption = p.with_suffix(".txt").read_text(encoding="utf-8")
        assert "red" not in caption and caption.startswith("a ") and caption.endswith(" background\n")
        r, g, b = np.asarray(Image.open(p), dtype=np.float64).reshape(-1, 3).mean(0)
        assert r > max(g, b) + 20


def test_resolve_dataset_ref(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTK_CACHE", str(tmp_path / "cache"))
    assert demo.resolve_dataset_ref("some/folder") == Path("some/folder")
    built = demo.resolve_dataset_ref("demo:blue")
    assert built == tmp_path / "cache" / "datasets" / "blue"
    assert len(_files(built, ".png")) == 15
    stamp = (built / "blue_circle_white.png").stat().st_mtime_ns
    assert demo.resolve_dataset_ref("demo:blue") == built  # reused, not rebuilt
    assert (built / "blue_circle_white.png").stat().st_mtime_ns == stamp
    # A stale generator version is rebuilt.
    (built / demo.MARKER).write_text('{"variant": "blue", "version": -1}', encoding="utf-8")
    demo.resolve_dataset_ref("demo:blue")
    assert demo._is_current(built, "blue")
    assert not list((tmp_path / "cache" / "datasets").glob(".*tmp*"))
    with pytest.raises(DataError, match="demo:shapes"):
        demo.resolve_dataset_ref("demo:purple")


def test_command_line(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path / "d"), "--variant", "yellow"]) == 0
    assert "15 images" in capsys.readouterr().out
    assert len(_files(tmp_path / "d", ".txt")) == 15
