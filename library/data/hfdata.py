"""Hugging Face `datasets` datasets as subsets: a parquet file or folder, a `save_to_disk` folder, an imagefolder
(images + metadata.jsonl / metadata.csv), or a hub id.

Everything is read through the `datasets` library (imported only when such a subset is used): `load_dataset`
converts a parquet file or an imagefolder once into its memory-mapped Arrow cache (the HF datasets cache,
$HF_DATASETS_CACHE), `load_from_disk` maps a saved dataset directly. Indexing reads the image, caption and
caption-level columns in batches of `BATCH` rows (the image's header only, for its size), so a 100k-row dataset is
never held in memory whole (bench/bench_hfdata.py measures it); training decodes one row at a time.

Images whose row holds a file path (an imagefolder, or a path column) become ordinary file items, so they cache and
fail exactly like images of a folder. Images held as bytes (parquet, saved datasets) are read through `RowImages`,
keyed by the dataset's fingerprint and the row number.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from library.errors import DataError

BATCH = 512  # rows per read while indexing
LEVEL_KEYS = (("tags", "tags_column"), ("short", "short_column"), ("detailed", "detailed_column"))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("data.dataset_path / dataset_name need the `datasets` package: pip install datasets") from None
    return datasets


def dataset_kind(path: Path) -> str:
    """'save_to_disk', 'parquet' or 'imagefolder' for a local dataset path (DataError if it is none of them)."""
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "parquet"
        raise DataError(f"{path}: a dataset file must be .parquet (or give a folder: save_to_disk, parquet files, or "
                        "images with metadata.jsonl / metadata.csv)")
    if not path.is_dir():
        raise DataError(f"dataset {path} not found")
    if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                  and (path / "dataset_info.json").is_file()):
        return "save_to_disk"
    if any(path.rglob("*.parquet")):
        return "parquet"
    return "imagefolder"


def _cache_dir() -> str | None:
    # Read at call time (datasets reads HF_DATASETS_CACHE once, when it is first imported).
    return os.environ.get("HF_DATASETS_CACHE") or None


def open_dataset(path: str, name: str, split: str):
    """The `datasets.Dataset` of one split. Errors name the dataset and what to change."""
    ds_lib = _datasets()
    where = f"dataset {path or name!r}"
    try:
        if name:
            ds = ds_lib.load_dataset(name, split=split, cache_dir=_cache_dir())
        else:
            p = Path(path)
            kind = dataset_kind(p)
            if kind == "save_to_disk":
                ds = ds_lib.load_from_disk(str(p))
                if isinstance(ds, ds_lib.DatasetDict):
                    if split not in ds:
                        raise DataError(f"{where} has no split {split!r}; its splits: {', '.join(ds)} "
                                        "(set dataset_split)")
                    ds = ds[split]
            elif kind == "parquet":
                # pyarrow's pre_buffer (on by default in ParquetFragmentScanOptions) coalesces the reads of a whole
                # file ahead of the scan: converting a 400 MiB file peaked at 514 MiB of anonymous memory with it,
                # 144 MiB without (bench/bench_hfdata.py); local disks gain nothing from it.
                import pyarrow.dataset as pds

                files = {"data_files": {split: str(p)}} if p.is_file() else {"data_dir": str(p)}
                ds = ds_lib.load_dataset("parquet", **files, split=split, cache_dir=_cache_dir(),
                                         fragment_scan_options=pds.ParquetFragmentScanOptions(pre_buffer=False))
            else:
                ds = ds_lib.load_dataset(kind, data_dir=str(p), split=split, cache_dir=_cache_dir())
    except DataError:
        raise
    except ValueError as e:  # "Unknown split ..." and friends
        raise DataError(f"{where}: {e} (set dataset_split)") from None
    except (ConnectionError, FileNotFoundError) as e:
        raise DataError(f"{where} cannot be loaded ({e}); a hub id needs the hub (or its cached copy), a local "
                        "dataset belongs in dataset_path") from None
    except Exception as e:  # datasets raises its own types (DatasetNotFoundError, DatasetGenerationError, ...)
        raise DataError(f"{where} cannot be loaded: {type(e).__name__}: {e}") from None
    return ds


def check_columns(ds, image_column: str, caption_column: str, where: str, path: str = "") -> None:
    """DataError naming the missing image / caption column and the columns the dataset has."""
    cols = list(ds.column_names)
    missing = [(k, c) for k, c in (("image_column", image_column), ("caption_column", caption_column)) if c
               and c not in cols]
    if missing:
        what = "; ".join(f"{k} = {c!r} is not one of its columns" for k, c in missing)
        hint = ""
        p = Path(path) if path else None
        if p is not None and p.is_dir() and dataset_kind(p) == "imagefolder" and not any(
                (p / m).is_file() for m in ("metadata.jsonl", "metadata.csv")):
            hint = ("; an imagefolder's captions come from its metadata.jsonl / metadata.csv, and a folder of images "
                    "with caption files belongs in data.train_data_dir")
        raise DataError(f"{where}: {what}; its columns are: {', '.join(cols)} (set "
                        f"{' and '.join(k for k, _ in missing)}){hint}")


class RowImages:
    """Encoded images held in a dataset's rows, read one row at a time (picklable: DataLoader workers reopen the
    memory-mapped Arrow files)."""

    def __init__(self, ds, column: str, label: str):
        self.ds = ds.select_columns([column]).with_format("arrow")
        self.column, self.label = column, label
        self.fingerprint = ds._fingerprint

    def display(self, row: int) -> Path:
        return Path(f"{self.label}[{row}]")

    def cache_key(self, row: int) -> str:
        return f"datasets:{self.fingerprint}:{row}"

    def data(self, row: int) -> bytes:
        value = self.ds[row].column(self.column)[0].as_py()
        return value["bytes"] if isinstance(value, dict) else value

    def load(self, row: int, fit=None):
        from library.data.images import BadImage, load_image

        data = self.data(row)
        if not data:
            raise BadImage("empty image (0 bytes)")
        return load_image(data, fit)


def _image_value(value: Any, base: Path | None) -> tuple[bytes | None, Path | None]:
    """(bytes, path) of one image cell: an Image / {bytes, path} struct, raw bytes, or a path string."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return bytes(data), None
        value = path
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str) and value:
        p = Path(value)
        return None, p if p.is_absolute() or base is None else base / p
    return None, None


def _text(value: Any) -> list[str]:
    """Caption cell -> alternatives: a string (its non-empty lines, as the lines of a caption file) or a list of
    strings (one alternative each, e.g. COCO's several captions per image)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    return [str(value)]


def scan_rows(s, ds):
    """Yield (row, bytes | None, path | None, captions, levels) for every row, reading BATCH rows at a time."""
    cols = [s.image_column] + [c for c in (s.caption_column,) if c]
    levels = [(lvl, getattr(s, key)) for lvl, key in LEVEL_KEYS if getattr(s, key) in ds.column_names]
    cols += [c for _, c in levels if c not in cols]
    base = Path(s.dataset_path) if s.dataset_path and Path(s.dataset_path).is_dir() else (
        Path(s.dataset_path).parent if s.dataset_path else None)
    table = ds.select_columns(cols).with_format("arrow")
    row = 0
    for batch in table.iter(batch_size=BATCH):
        images = batch.column(s.image_column).to_pylist()
        caps = batch.column(s.caption_column).to_pylist() if s.caption_column else [None] * len(images)
        lv = {lvl: batch.column(c).to_pylist() for lvl, c in levels}
        for j, cell in enumerate(images):
            data, path = _image_value(cell, base)
            tags = {lvl: _tag_text(lvl, vals[j]) for lvl, vals in lv.items()}
            yield row, data, path, _text(caps[j]), {k: v for k, v in tags.items() if v}
            row += 1


def _tag_text(level: str, value: Any) -> list[str]:
    """A level cell: like a caption cell, except that a list in the tags level is one caption of those tags."""
    if level == "tags" and isinstance(value, list):  # a list of tags is one caption
        return [", ".join(v.strip() for v in value if isinstance(v, str) and v.strip())] if value else []
    return _text(value)
