"""Dataset quality report: every planted problem is found (and nothing else), a clean image is not flagged,
exit codes, JSON report, quick mode."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

import check_dataset
from library.data import demo, doctor, imagestats


def busy(seed: int, size: tuple[int, int] = (320, 288)) -> Image.Image:
    """A cluttered, sharp, normally exposed image: mid-tone ellipses and boxes over the whole canvas."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randint(60, 190) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(60):
        x0, y0 = rng.randint(-20, w), rng.randint(-20, h)
        box = [x0, y0, x0 + rng.randint(10, w // 3), y0 + rng.randint(10, h // 3)]
        colour = tuple(rng.randint(40, 215) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def pure_colours(size: tuple[int, int] = (320, 256)) -> Image.Image:
    """Stripes of fully saturated primaries: every pixel has a clipped channel."""
    img = Image.new("RGB", size, (255, 0, 0))
    draw = ImageDraw.Draw(img)
    for k, colour in enumerate([(0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)] * 4):
        draw.rectangle([k * 20 + 10, 0, k * 20 + 19, size[1]], fill=colour)
    return img


# file -> the one finding kind it must produce ("" = none)
PLANTED = {
    "clean.png": "",
    "dup_a.png": "",
    "dup_b.jpg": "near_duplicate",
    "blurred.png": "blurry",
    "dark.png": "dark",
    "bright.png": "bright",
    "tiny.png": "tiny",
    "wide.png": "extreme_aspect",
    "saturated.png": "oversaturated",
    "solid_bg.png": "solid_background",
    "blank.png": "blank",
    "truncated.jpg": "truncated",
    "corrupt.png": "unreadable",
    "zero.png": "zero_byte",
    "rotated.jpg": "exif_rotated",
    "nocap.png": "missing_caption",
    "emptycap.png": "empty_caption",
    "longcap.png": "long_caption",
    "latin1cap.txt": "caption_unreadable",  # the finding names the file to fix
    "notes.docx": "not_image",
    "10_sks dog/photo.png": "folder_caption",
}


def plant(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    seed = iter(range(100, 200))
    for name in ["clean.png", "nocap.png", "emptycap.png", "longcap.png", "latin1cap.png"]:
        busy(next(seed)).save(root / name)
    busy(7).save(root / "dup_a.png")
    busy(7).resize((300, 270), Image.Resampling.BICUBIC).save(root / "dup_b.jpg", quality=90)
    busy(next(seed)).filter(ImageFilter.GaussianBlur(4)).save(root / "blurred.png")
    Image.eval(busy(next(seed)), lambda v: v * 0.15).save(root / "dark.png")
    Image.eval(busy(next(seed)), lambda v: 215 + v * 40 / 255).save(root / "bright.png")
    busy(next(seed), (120, 100)).save(root / "tiny.png")
    busy(next(seed), (900, 256)).save(root / "wide.png")
    pure_colours().save(root / "saturated.png")
    solid = Image.new("RGB", (320, 256), (250, 250, 250))
    ImageDraw.Draw(solid).ellipse([80, 40, 240, 210], fill=(30, 60, 150))
    solid.save(root / "solid_bg.png")
    Image.new("RGB", (320, 256), (128, 128, 128)).save(root / "blank.png")
    data = _jpeg_bytes(busy(next(seed)))
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "corrupt.png").write_bytes(b"this is not a picture at all " * 10)
    (root / "zero.png").write_bytes(b"")
    exif = Image.Exif()
    exif[doctor.EXIF_ORIENTATION] = 6  # "rotate 90 CW to display": stored 320x288, shown 288x320
    busy(next(seed)).save(root / "rotated.jpg", quality=92, exif=exif)
    (root / "notes.docx").write_bytes(b"PK\x03\x04 not an image")
    (root / "10_sks dog").mkdir()
    busy(next(seed)).save(root / "10_sks dog" / "photo.png")
    for name in PLANTED:
        if name.endswith((".png", ".jpg")) and "/" not in name and name not in ("nocap.png",):
            (root / name).with_suffix(".txt").write_text(f"a picture, {name[:-4]}, test", encoding="utf-8")
    (root / "emptycap.txt").write_text("  \n", encoding="utf-8")
    (root / "longcap.txt").write_text(" ".join(["word"] * 70), encoding="utf-8")
    (root / "latin1cap.txt").write_bytes("un caf\u00e9 au lait".encode("latin-1"))
    return root


def _jpeg_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return plant(tmp_path_factory.mktemp("planted") / "data")


@pytest.fixture(scope="module")
def report(planted) -> doctor.Report:
    return doctor.scan(planted)


def test_every_planted_problem_is_found_and_nothing_else(report):
    found: dict[str, set[str]] = {}
    for f in report.findings:
        found.setdefault(f.path, set()).add(f.kind)
    expected = {name: {kind} for name, kind in PLANTED.items() if kind}
    assert found == expected


def test_blocking_findings_and_exit_code(report):
    assert {f.kind for f in report.blocking} == {"truncated", "unreadable", "zero_byte", "caption_unreadable"}
    assert report.exit_code == 1
    assert report.skipped_images() == ["corrupt.png", "truncated.jpg", "zero.png"]
    assert report.n_image_files == 20 and len(report.images) == 17


def test_image_facts(report):
    info = {i.path: i for i in report.images}
    assert (info["rotated.jpg"].width, info["rotated.jpg"].height, info["rotated.jpg"].exif_orientation) == \
        (288, 320, 6)
    assert (info["wide.png"].width, info["wide.png"].height) == (900, 256)
    assert info["10_sks dog/photo.png"].caption == "sks dog"
    assert info["nocap.png"].caption is None and info["emptycap.png"].caption == ""
    dup = next(f for f in report.findings if f.kind == "near_duplicate")
    assert "dup_a.png" in dup.message and dup.value <= 2


def test_caption_histograms(report):
    hist = report.caption_word_histogram()
    assert hist["0"] == 1 and hist["41-75"] == 1 and hist["1-5"] == 13
    tags = report.tag_frequency()
    assert tags["a picture"] == 12 and tags["test"] == 12 and tags["clean"] == 1
    assert list(tags)[:2] == ["a picture", "test"]


def test_quick_mode_lists_skipped_images_only(planted):
    quick = doctor.quick_check(planted)
    assert quick.quick and quick.skipped_images() == ["corrupt.png", "truncated.jpg", "zero.png"]
    kinds = {f.kind for f in quick.findings}
    assert not kinds & {"blurry", "dark", "bright", "near_duplicate", "tiny", "solid_background"}
    assert {"missing_caption", "exif_rotated", "truncated"} <= kinds
    assert all(i.stats is None for i in quick.images)


def test_clean_demo_dataset_passes(tmp_path):
    root = demo.make_demo_dataset(tmp_path / "demo", "shapes")
    rep = doctor.scan(root, thresholds=doctor.Thresholds(min_side=64))
    assert rep.exit_code == 0 and len(rep.images) == 60
    assert {f.kind for f in rep.findings} == {"solid_background"}  # the demo is plain shapes on plain backgrounds


def test_dataset_wide_blocks(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [f.kind for f in doctor.scan(empty).findings] == ["no_images"]
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    for k in range(2):
        busy(k).save(uncaptioned / f"{k}.png")
    rep = doctor.scan(uncaptioned)
    assert rep.exit_code == 1 and [f.kind for f in rep.blocking] == ["no_captions"]
    relaxed = doctor.scan(uncaptioned, thresholds=doctor.Thresholds(require_captions=False))
    assert relaxed.exit_code == 0
    # A different caption extension finds them.
    for k in range(2):
        (uncaptioned / f"{k}.caption").write_text("a thing", encoding="utf-8")
    assert doctor.scan(uncaptioned, caption_extension=".caption").exit_code == 0


def test_command_line_exit_codes_and_json(planted, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert check_dataset.main([str(planted), "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "BLOCK     truncated" in text and "Result: 4 blocking problem(s)" in text
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["exit_code"] == 1 and data["counts"]["findings"]["near_duplicate"] == 1
    assert {f["path"] for f in data["findings"] if f["kind"] == "blurry"} == {"blurred.png"}
    assert data["thresholds"]["min_side"] == 256
    assert any(i["path"] == "clean.png" and len(i["phash"]) == 16 for i in data["images"])

    demo_dir = demo.make_demo_dataset(tmp_path / "demo", "red")
    assert check_dataset.main([str(demo_dir), "--min-side", "64", "--json", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["counts"]["readable_images"] == 15
    assert "Result: nothing blocking (exit 0)" in capsys.readouterr().out

    assert check_dataset.main([str(tmp_path / "missing")]) == 2
    assert "error: dataset folder" in capsys.readouterr().err


def test_same_image_extensions_as_the_loader():
    from library.data import images  # imports torch; the doctor itself must not

    assert doctor.IMAGE_EXTENSIONS == images.IMAGE_EXTENSIONS


def test_pure_statistics():
    flat = np.full((5, 5), 10.0)
    assert imagestats.laplacian_variance(flat) == 0.0
    dot = flat.copy()
    dot[2, 2] = 14.0  # interior Laplacian: -16 at the centre, +4 at its 4 neighbours, 0 at the other 4 of 3x3
    assert imagestats.laplacian_variance(dot) == pytest.approx(np.var([-16, 4, 4, 4, 4, 0, 0, 0, 0]))
    ramp = np.arange(101, dtype=np.float64)  # percentiles 1 and 99 are 1.0 and 99.0
    assert imagestats.stretch(ramp)[[1, 50, 99]].tolist() == pytest.approx([0.0, 255 * 49 / 98, 255.0])
    assert imagestats.stretch(np.array([10.0, 12.0]), min_range=8.0).max() <= 255 * 2 / 8 + 1e-9
    rgb = np.array([[[255, 0, 0], [250, 250, 250]], [[10, 0, 0], [200, 100, 100]]], dtype=np.uint8)
    assert imagestats.saturated_fraction(rgb) == 0.25  # (10, 0, 0) is too dark to count
    assert imagestats.luma(rgb)[0, 0] == pytest.approx(0.299 * 255)
    hashes = ["0000000000000000", "ff00000000000001", "0000000000000003", "ff00000000000001"]
    assert imagestats.close_pairs(hashes, 2) == [(0, 2, 2), (1, 3, 0)]
    assert imagestats.close_pairs(hashes, 9)[:2] == [(0, 1, 9), (0, 2, 2)]
    ring = imagestats.border_ring(np.arange(6 * 6 * 3).reshape(6, 6, 3), frac=0.2)
    assert ring.shape == (20, 3)  # 36 pixels minus the 4x4 interior
