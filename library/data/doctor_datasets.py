"""Dataset quality report for a Hugging Face `datasets` dataset: a parquet file or folder, a `save_to_disk` folder,
or an imagefolder with metadata.jsonl / metadata.csv (what data.dataset_path trains on).

The same checks as `doctor.scan` on a folder, row by row: each image is decoded once (rows hold bytes or a file
path), captions come from the caption column, and the report lists the dataset's columns. A missing image or
caption column is a DataError naming the columns there (check_dataset.py exits 2).
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from library.data import hfdata
from library.data.doctor import (Finding, ImageInfo, Report, Thresholds, check_decoded, long_caption_findings,
                                 near_duplicates)


def is_dataset(path: str | Path) -> bool:
    """True for what `scan_dataset` reads rather than `doctor.scan`: a parquet file or folder, a save_to_disk folder,
    or a folder with a top-level metadata.jsonl / metadata.csv (an imagefolder)."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".parquet"
    if not p.is_dir():
        return False
    return hfdata.dataset_kind(p) != "imagefolder" or any((p / m).is_file() for m in ("metadata.jsonl", "metadata.csv"))


def scan_dataset(path: str, *, split: str = "train", image_column: str = "image", caption_column: str = "text",
                 thresholds: Thresholds | None = None, quick: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Report:
    th = thresholds or Thresholds()
    ds = hfdata.open_dataset(path, "", split)
    where = f"dataset {path!r} (split {split!r})"
    hfdata.check_columns(ds, image_column, caption_column, where, path)
    spec = SimpleNamespace(dataset_path=path, image_column=image_column, caption_column=caption_column,
                           tags_column="", short_column="", detailed_column="")
    base = Path(path) if Path(path).is_dir() else Path(path).parent
    findings: list[Finding] = []
    images: list[ImageInfo] = []
    n = len(ds)
    for row, data, file, captions, _ in hfdata.scan_rows(spec, ds):
        if progress is not None:
            progress(row, n)
        rel = _label(row, file, base)
        if data is None and (file is None or not file.is_file()):
            findings.append(Finding("unreadable", rel, f"no image in column {image_column!r}" if file is None
                                    else f"image file {file} not found"))
            continue
        if (data is not None and len(data) == 0) or (data is None and file.stat().st_size == 0):
            findings.append(Finding("zero_byte", rel, "empty image (0 bytes): re-export or drop the row"))
            continue

        def caption_of(rel=rel, captions=captions) -> str | None:
            if not caption_column:
                return None
            if not captions:
                findings.append(Finding("missing_caption", rel, f"no caption in column {caption_column!r}"))
                return None
            return captions[0]

        info = check_decoded(io.BytesIO(data) if data is not None else file, rel, caption_of, th, findings,
                             quick=quick)
        if info is not None:
            images.append(info)
    if n == 0:
        findings.append(Finding("no_images", "", f"{where} has no rows"))
    elif images and th.require_captions and not any(i.caption for i in images):
        findings.append(Finding("no_captions", "", f"no row has a caption in column {caption_column!r}: set "
                                                   "--caption-column to the column that holds them"))
    if not quick:
        findings.extend(long_caption_findings(images, th.max_caption_words))
        findings.extend(near_duplicates(images, th))
    return Report(f"{path} (split {split})", quick, th, images, findings, n, 0, columns=list(ds.column_names))


def _label(row: int, file: Path | None, base: Path) -> str:
    """How a row is named in findings: its file relative to the dataset folder, else `row N`."""
    if file is not None:
        try:
            return file.relative_to(base).as_posix()
        except ValueError:
            return str(file)
    return f"row {row}"


def quick_check_subsets(subsets, caption_extension: str = ".txt") -> list[Report]:
    """The quick check (headers, decode, captions) of every image folder and every local dataset the subsets
    (dataset_file.SubsetSpec) train on, each once: what `--dry-run` reports before a run."""
    from library.data.doctor import quick_check

    reports, seen = [], set()
    for s in subsets:
        if s.dataset_path:
            key = ("dataset", s.dataset_path, s.dataset_split, s.image_column, s.caption_column)
            if key not in seen:
                reports.append(scan_dataset(s.dataset_path, split=s.dataset_split, image_column=s.image_column,
                                            caption_column=s.caption_column, quick=True))
        elif s.image_dir and not s.metadata_file:
            key = ("folder", s.image_dir)
            if key not in seen:
                reports.append(quick_check(s.image_dir, s.caption_extension or caption_extension))
        else:
            continue
        seen.add(key)
    return reports
