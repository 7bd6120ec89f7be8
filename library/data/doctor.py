"""Dataset quality report: finds what would silently hurt a fine-tune before the GPU time is spent.

`scan(root)` walks an image folder (recursively, sd-scripts layout: `name.png` + `name.txt`; hidden files and folders
are ignored), decodes each image ONCE (JPEGs at reduced scale through PIL's `draft`, others downscaled with
`thumbnail` straight after decoding, so at most one full image is in memory) and returns a `Report` of findings.

Findings and their severity (`SEVERITY`):
- block (exit code 1): `zero_byte`, `truncated`, `unreadable` image files, `caption_unreadable` (caption file not
  UTF-8), `no_images` (nothing to train on), `no_captions` (not one image has a caption; turn off with
  `require_captions=False` when you train on class / instance prompts only).
- warn: `tiny` (short side < min_side), `extreme_aspect` (long / short > max_aspect; the bucket crop loses most of
  it), `near_duplicate` (perceptual hash), `blurry` (variance of the Laplacian), `dark`, `bright` (under- /
  over-exposure), `oversaturated` (clipped colour channels), `blank` (one flat colour), `missing_caption`,
  `empty_caption`.
- info: `exif_rotated` (the EXIF orientation is applied on load, so the model sees the rotated picture; listed so a
  wrong tag can be spotted), `solid_background` (uniform border: the model will learn the background too),
  `not_image` (a file the loader skips), `folder_caption` (no caption file, the sd-scripts `<repeats>_<caption>`
  folder name is the caption), `long_caption` (more words than fit CLIP's 75-token window).

`quick=True` only checks headers, decodes (the cheapest way PIL allows) and captions: the training scripts run it at
start to list the images they skip. A Hugging Face `datasets` dataset is checked row by row with the same checks by
`library.data.doctor_datasets.scan_dataset`. Thresholds are the fields of `Thresholds`, with documented defaults.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from library.config.fields import opt
from library.data import imagestats
from library.errors import DataError

Severity = Literal["block", "warn", "info"]

# sd-scripts' IMAGE_EXTENSIONS (library/train_util.py), without the optional avif/jxl plugins.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# Files that legitimately sit next to images and are not reported as `not_image`.
SIDECAR_EXTENSIONS = frozenset({".txt", ".caption", ".tags", ".npz", ".json", ".toml", ".safetensors"})
EXIF_ORIENTATION = 0x0112
FOLDER_CAPTION = re.compile(r"^\d+_(.+)$")  # sd-scripts DreamBooth folders: "<repeats>_<class or caption>"

SEVERITY: dict[str, Severity] = {
    "zero_byte": "block", "truncated": "block", "unreadable": "block", "caption_unreadable": "block",
    "no_images": "block", "no_captions": "block",
    "tiny": "warn", "extreme_aspect": "warn", "near_duplicate": "warn", "blurry": "warn", "dark": "warn",
    "bright": "warn", "oversaturated": "warn", "blank": "warn", "missing_caption": "warn", "empty_caption": "warn",
    "exif_rotated": "info", "solid_background": "info", "not_image": "info", "folder_caption": "info",
    "long_caption": "info",
}
WORD_BINS = ((0, 0), (1, 5), (6, 10), (11, 20), (21, 40), (41, 75), (76, None))


@dataclasses.dataclass
class Thresholds:
    """What counts as a problem. Luma and colour values are on the 0-255 scale, measured after downscaling."""

    analysis_size: int = opt(512, "images are downscaled to fit this square (never upscaled) before statistics")
    min_side: int = opt(256, "warn `tiny` when the short side (pixels) is below this")
    max_aspect: float = opt(3.0, "warn `extreme_aspect` when long side / short side is above this")
    blur: float = opt(100.0, "warn `blurry` when the variance of the Laplacian of contrast-stretched luma is below "
                             "this (sharp flat-colour art scores 1000+, a 2 px Gaussian blur drops it below 50)")
    dark_p95: float = opt(50.0, "warn `dark` when the 95th percentile of luma is below this (nothing is bright)")
    bright_p05: float = opt(205.0, "warn `bright` when the 5th percentile of luma is above this (nothing is dark)")
    saturated: float = opt(0.4, "warn `oversaturated` when more than this share of pixels has a clipped channel "
                                "(HSV saturation >= 0.95)")
    blank_std: float = opt(2.0, "warn `blank` when the luma standard deviation of the whole image is below this")
    solid_border_std: float = opt(4.0, "note `solid_background` when every channel of the border ring varies less "
                                       "than this (standard deviation)")
    duplicate_bits: int = opt(5, "warn `near_duplicate` when perceptual hashes (64 bits) differ in at most this many")
    duplicate_colour: float = opt(24.0, "... and the mean colours are closer than this (Euclidean, RGB)")
    max_caption_words: int = opt(60, "note `long_caption` above this many words (~75 CLIP tokens)")
    require_captions: bool = opt(True, "block when not a single image has a caption")


@dataclasses.dataclass
class Finding:
    """One problem: `path` is relative to the scanned folder ("" for dataset-wide findings)."""

    kind: str
    path: str
    message: str
    value: float | None = None

    @property
    def severity(self) -> Severity:
        return SEVERITY[self.kind]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "path": self.path, "message": self.message,
                "value": self.value}


@dataclasses.dataclass
class ImageInfo:
    """What the scan learned about one readable image. Width / height are after EXIF rotation."""

    path: str
    width: int
    height: int
    format: str
    exif_orientation: int
    caption: str | None  # None: no caption file (and no folder caption)
    stats: imagestats.ImageStats | None  # None in quick mode


@dataclasses.dataclass
class Report:
    root: str
    quick: bool
    thresholds: Thresholds
    images: list[ImageInfo]
    findings: list[Finding]
    n_image_files: int
    n_other_files: int
    columns: list[str] | None = None  # a Hugging Face dataset's columns (library/data/doctor_datasets.py)

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "block"]

    @property
    def exit_code(self) -> int:
        """0 = nothing blocking, 1 = blocking problems (see the module docstring)."""
        return 1 if self.blocking else 0

    def skipped_images(self) -> list[str]:
        """Image files a loader cannot use (zero-byte, truncated, unreadable), relative to root."""
        return sorted({f.path for f in self.findings if f.kind in ("zero_byte", "truncated", "unreadable")})

    def by_kind(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = collections.defaultdict(list)
        for f in self.findings:
            out[f.kind].append(f)
        return dict(out)

    def caption_word_histogram(self) -> dict[str, int]:
        counts = {_bin_label(lo, hi): 0 for lo, hi in WORD_BINS}
        for info in self.images:
            if info.caption is not None:
                counts[_word_bin(len(info.caption.split()))] += 1
        return counts

    def tag_frequency(self) -> dict[str, int]:
        """Comma-separated tags counted over all captions, most frequent first (as sd-scripts' ss_tag_frequency
        splits captions on commas; a natural-language caption is one long "tag")."""
        counter: collections.Counter[str] = collections.Counter()
        for info in self.images:
            if info.caption:
                counter.update({t.strip() for t in info.caption.split(",") if t.strip()})
        return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "quick": self.quick,
            **({"columns": self.columns} if self.columns is not None else {}),
            "exit_code": self.exit_code,
            "counts": {"image_files": self.n_image_files, "readable_images": len(self.images),
                       "captioned": sum(i.caption is not None and i.caption.strip() != "" for i in self.images),
                       "other_files": self.n_other_files, "blocking": len(self.blocking),
                       "findings": {k: len(v) for k, v in self.by_kind().items()}},
            "thresholds": dataclasses.asdict(self.thresholds),
            "findings": [f.to_dict() for f in self.findings],
            "images": [_image_json(i) for i in self.images],
            "captions": {"words_histogram": self.caption_word_histogram(), "tag_frequency": self.tag_frequency()},
        }


def scan(root: str | os.PathLike, *, caption_extension: str = ".txt", thresholds: Thresholds | None = None,
         quick: bool = False, progress: Callable[[int, int], None] | None = None) -> Report:
    """Check every file under `root` and return the report (never raises for a bad image; only for a bad root)."""
    th = thresholds or Thresholds()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} does not exist or is not a folder")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    files = _walk(root)
    image_files = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    findings: list[Finding] = []
    sidecars = SIDECAR_EXTENSIONS | {caption_extension.lower()}
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS | sidecars]
    for p in others:
        findings.append(Finding("not_image", _rel(p, root), "not an image file; the loader skips it"))
    images: list[ImageInfo] = []
    for i, path in enumerate(image_files):
        if progress is not None:
            progress(i, len(image_files))
        info = check_image(path, root, caption_extension, th, findings, quick=quick)
        if info is not None:
            images.append(info)
    if not image_files:
        findings.append(Finding("no_images", "", f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in "
                                                f"{root}; point the dataset at the folder that holds the images"))
    elif images and th.require_captions and not any(i.caption for i in images):
        findings.append(Finding("no_captions", "", f"no image has a non-empty {caption_extension} caption file: "
                                                   f"write captions next to the images (name.png + name"
                                                   f"{caption_extension}) or pass the right --caption-extension"))
    if not quick:
        findings.extend(long_caption_findings(images, th.max_caption_words))
        findings.extend(near_duplicates(images, th))
    return Report(str(root), quick, th, images, findings, len(image_files), len(others))


def check_image(path: Path, root: Path, caption_extension: str, th: Thresholds, findings: list[Finding], *,
                quick: bool = False) -> ImageInfo | None:
    """Decode one image once, append its findings; returns None when it cannot be used."""
    rel = _rel(path, root)
    if path.stat().st_size == 0:
        findings.append(Finding("zero_byte", rel, "empty file (0 bytes): re-copy or delete it"))
        return None
    return check_decoded(path, rel, lambda: _caption(path, root, caption_extension, findings), th, findings,
                         quick=quick)


def check_decoded(src, rel: str, caption_of: Callable[[], str | None], th: Thresholds, findings: list[Finding], *,
                  quick: bool = False) -> ImageInfo | None:
    """`check_image` after the zero-byte check: `src` is a path or a file-like object (a dataset row's bytes),
    `caption_of()` returns its caption (appending its own findings)."""
    try:
        small, fmt, size, orientation = _decode(src, 64 if quick else th.analysis_size)
    except Exception as e:  # a doctor must survive any broken file; the message carries PIL's reason
        kind = "truncated" if "truncated" in str(e).lower() or isinstance(e, EOFError) else "unreadable"
        reason = "not a recognised image" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        findings.append(Finding(kind, rel, f"cannot decode ({reason}): re-export or delete it"))
        return None
    caption = caption_of()
    w, h = size
    info = ImageInfo(rel, w, h, fmt, orientation, caption, None)
    if orientation not in (0, 1):
        findings.append(Finding("exif_rotated", rel, f"EXIF orientation {orientation}: loaded rotated, as {w}x{h}",
                                orientation))
    if quick:
        return info
    if min(w, h) < th.min_side:
        findings.append(Finding("tiny", rel, f"{w}x{h}: short side below {th.min_side} px; it will be upscaled "
                                             f"(unless bucket_no_upscale)",
                                min(w, h)))
    aspect = max(w, h) / min(w, h)
    if aspect > th.max_aspect:
        findings.append(Finding("extreme_aspect", rel, f"{w}x{h}: aspect ratio {aspect:.2f} above {th.max_aspect}; "
                                                       f"the bucket crop will cut most of it", round(aspect, 3)))
    info.stats = st = imagestats.image_stats(small)
    findings.extend(_stat_findings(rel, st, small, th))
    return info


def _stat_findings(rel: str, st: imagestats.ImageStats, small: Image.Image, th: Thresholds) -> list[Finding]:
    out = []
    luma_std = float(imagestats.luma(np.asarray(small)).std())
    if luma_std < th.blank_std:
        out.append(Finding("blank", rel, f"one flat colour (luma std {luma_std:.1f})", round(luma_std, 3)))
    elif st.sharpness < th.blur:
        out.append(Finding("blurry", rel, f"sharpness {st.sharpness:.1f} below {th.blur} (variance of the "
                                          f"Laplacian at {small.width}x{small.height})", round(st.sharpness, 3)))
    if st.luma_p95 < th.dark_p95:
        out.append(Finding("dark", rel, f"under-exposed: 95% of pixels darker than luma {st.luma_p95:.0f}",
                           round(st.luma_p95, 3)))
    if st.luma_p05 > th.bright_p05:
        out.append(Finding("bright", rel, f"over-exposed: 95% of pixels brighter than luma {st.luma_p05:.0f}",
                           round(st.luma_p05, 3)))
    if st.saturated_fraction > th.saturated:
        out.append(Finding("oversaturated", rel, f"{st.saturated_fraction:.0%} of pixels have a clipped colour "
                                                 f"channel", round(st.saturated_fraction, 4)))
    if st.border_std < th.solid_border_std and luma_std >= th.blank_std:
        out.append(Finding("solid_background", rel, f"uniform border, colour {st.border_colour}",
                           round(st.border_std, 3)))
    return out


def near_duplicates(images: list[ImageInfo], th: Thresholds) -> list[Finding]:
    """Group images whose perceptual hashes AND mean colours are close (union-find); each member after the first
    of a group gets one finding naming the first. pHash (DCT of a 32x32 grayscale, Zauner 2010 via imagehash) is
    blind to colour, so the colour check keeps a red and a blue copy of one layout apart."""
    items = [i for i in images if i.stats is not None]
    if len(items) < 2:
        return []
    colours = np.array([i.stats.mean_colour for i in items])
    parent = list(range(len(items)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    hashes = [i.stats.phash for i in items]
    for a, b, _ in imagestats.close_pairs(hashes, th.duplicate_bits):
        if np.linalg.norm(colours[a] - colours[b]) < th.duplicate_colour:
            parent[find(b)] = find(a)
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for k in range(len(items)):
        groups[find(k)].append(k)
    out = []
    for members in groups.values():
        first = min(members)
        for m in sorted(members):
            if m != first:
                d = imagestats.close_pairs([hashes[first], hashes[m]], 64)[0][2]
                out.append(Finding("near_duplicate", items[m].path, f"near-duplicate of {items[first].path} "
                                                                    f"(pHash distance {d})", d))
    return out


def quick_check(root: str | os.PathLike, caption_extension: str = ".txt") -> Report:
    """Headers + decode + captions only: what a training script runs at start to list the images it skips."""
    return scan(root, caption_extension=caption_extension, quick=True)


def _decode(path, max_side: int) -> tuple[Image.Image, str, tuple[int, int], int]:
    """Open, decode (reduced), downscale and EXIF-rotate one image. Returns (small RGB, format, full size after
    rotation, EXIF orientation or 0)."""
    with Image.open(path) as im:
        fmt = im.format or "?"
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 0) or 0)
        full = im.size
        if fmt == "JPEG":
            im.draft("RGB", (max_side, max_side))  # DCT-domain downscale: decodes at 1/2, 1/4 or 1/8 size
        im.load()  # the decode check: raises on truncated / corrupt data
        small = im.convert("RGB")
    small.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    small = ImageOps.exif_transpose(small) if orientation not in (0, 1) else small
    if orientation in (5, 6, 7, 8):  # these orientations swap width and height
        full = (full[1], full[0])
    return small, fmt, full, orientation


def _caption(path: Path, root: Path, ext: str, findings: list[Finding]) -> str | None:
    rel = _rel(path, root)
    cap = path.with_suffix(ext)
    if not cap.is_file():
        m = FOLDER_CAPTION.match(path.parent.name) if path.parent != root else None
        if m:
            findings.append(Finding("folder_caption", rel, f"no {ext} file: the folder name gives the caption "
                                                           f"{m.group(1)!r}"))
            return m.group(1)
        findings.append(Finding("missing_caption", rel, f"no caption file {cap.name}"))
        return None
    try:
        text = cap.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        findings.append(Finding("caption_unreadable", _rel(cap, root), "caption is not UTF-8 text: re-save it as UTF-8"))
        return None
    if not text:
        findings.append(Finding("empty_caption", rel, f"{cap.name} is empty"))
        return ""
    return text


def long_caption_findings(images: Iterable[ImageInfo], max_words: int) -> list[Finding]:
    out = []
    for info in images:
        if info.caption and len(info.caption.split()) > max_words:
            out.append(Finding("long_caption", info.path, f"{len(info.caption.split())} words: past CLIP's 75-token "
                                                          f"window the rest is cut unless max_token_length is raised",
                               len(info.caption.split())))
    return out


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def _bin_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else (str(lo) if lo == hi else f"{lo}-{hi}")


def _word_bin(n: int) -> str:
    for lo, hi in WORD_BINS:
        if n >= lo and (hi is None or n <= hi):
            return _bin_label(lo, hi)
    raise AssertionError(n)


def _image_json(i: ImageInfo) -> dict:
    d = {"path": i.path, "width": i.width, "height": i.height, "format": i.format,
         "exif_orientation": i.exif_orientation,
         "caption_words": None if i.caption is None else len(i.caption.split())}
    if i.stats is not None:
        d.update({k: v for k, v in dataclasses.asdict(i.stats).items()})
    return d


def format_report(report: Report, max_rows: int = 10, top_tags: int = 15) -> str:
    """The terminal view: a summary table per finding kind, the first `max_rows` findings of each kind, size and
    caption histograms, and the verdict. The JSON file has everything."""
    n_read = len(report.images)
    n_cap = sum(bool(i.caption) for i in report.images)
    mode = " (quick: headers, decode and captions only)" if report.quick else ""
    lines = [f"Dataset report for {report.root}{mode}",
             f"  {report.n_image_files} image files ({n_read} readable), {n_cap} captioned, "
             f"{report.n_other_files} other files (not images, not captions or known sidecars)", ""]
    if report.columns is not None:
        lines[1:2] = [f"  {report.n_image_files} rows ({n_read} readable images), {n_cap} captioned; columns: "
                      f"{', '.join(report.columns)}"]
    order = {"block": 0, "warn": 1, "info": 2}
    kinds = sorted(report.by_kind().items(), key=lambda kv: (order[SEVERITY[kv[0]]], kv[0]))
    if kinds:
        lines.append(f"  {'severity':<9} {'finding':<19} {'count':>5}  first")
        for kind, fs in kinds:
            sev = "BLOCK" if SEVERITY[kind] == "block" else SEVERITY[kind]
            lines.append(f"  {sev:<9} {kind:<19} {len(fs):>5}  {fs[0].path or '(dataset)'}")
        lines += ["", "Details (first %d of each kind; all of them in the JSON report):" % max_rows]
        for kind, fs in kinds:
            for f in fs[:max_rows]:
                lines.append(f"  [{SEVERITY[kind]}] {kind}: {f.path or '(dataset)'}: {f.message}")
            if len(fs) > max_rows:
                lines.append(f"  [{SEVERITY[kind]}] {kind}: ... and {len(fs) - max_rows} more")
    else:
        lines.append("  no findings")
    if report.images:
        shorts = sorted(min(i.width, i.height) for i in report.images)
        shape = collections.Counter("square" if 0.95 <= i.width / i.height <= 1.05 else
                                    ("landscape" if i.width > i.height else "portrait") for i in report.images)
        lines += ["", f"Sizes: short side min {shorts[0]} / median {shorts[len(shorts) // 2]} / max {shorts[-1]} px; "
                      + ", ".join(f"{k} {v}" for k, v in sorted(shape.items()))]
        hist = report.caption_word_histogram()
        peak = max(hist.values()) or 1
        lines.append("Words per caption:")
        lines += [f"  {label:>6} | {'#' * round(30 * n / peak):<30} {n}" for label, n in hist.items()]
        tags = report.tag_frequency()
        if any("," in (i.caption or "") for i in report.images):
            lines.append(f"Top tags ({min(top_tags, len(tags))} of {len(tags)} distinct, comma-separated):")
            lines += [f"  {n:>6}  {tag}" for tag, n in list(tags.items())[:top_tags]]
    lines.append("")
    if report.blocking:
        lines.append(f"Result: {len(report.blocking)} blocking problem(s) -- fix or remove those files (exit 1)")
    else:
        lines.append("Result: nothing blocking (exit 0)")
    return "\n".join(lines)
