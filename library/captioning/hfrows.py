"""Captioning a Hugging Face `datasets` dataset: the captions become columns of a captioned copy.

The dataset is opened by the training loader's reader (library/data/hfdata.py: parquet, save_to_disk, imagefolder),
so what trains is what was captioned. A parquet or saved dataset cannot take sidecar files and is not rewritten in
place; the captions go to `caption_column` (modes text / tags) or to the level columns `tags`, `short`, `detailed`
(the names [data] reads) of a copy written with `save_to_disk` to `output_dataset`, atomically (the folder appears
complete or not at all).

Resuming: every caption is first appended to `<output_dataset>.captions.jsonl` (one JSON record per line, flushed
and fsynced per batch). That file is the run's record: a rerun skips the rows it holds and the rows whose column is
already filled in the source, so a killed run continues where it stopped and a finished one only retries the rows
that failed. `overwrite` captions every row again, as it rewrites every caption file of a folder (the newest record
of a row wins). A line cut by a kill is dropped when the next run starts.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from library.captioning.captioners import batches, empty_reason, load_captioners
from library.captioning.files import levels_of
from library.captioning.images import on_white
from library.config.caption import CaptionConfig
from library.errors import DataError
from library.fileio import atomic_path, write_text_atomic
from library.training.faults import kill_point

READ_BATCH = 512  # rows per read when looking at the existing captions


@dataclass
class RowPlan:
    todo: dict[str, list[int]]  # level -> rows still without that caption
    columns: dict[str, str]  # level -> column name
    rows: int = 0
    existing: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.todo.values())


def record_path(output: Path) -> Path:
    return output.with_name(output.name + ".captions.jsonl")


def read_records(path: Path, repair: bool = True) -> dict[tuple[str, int], str]:
    """(level, row) -> caption from the record file; a last line cut by a kill is dropped (and, with `repair`, the
    file rewritten without it, so later appends start on a fresh line)."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    out: dict[tuple[str, int], str] = {}
    good = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[(rec["level"], int(rec["row"]))] = rec["caption"]
        except (ValueError, KeyError, TypeError):
            break  # records are appended in order: nothing after a cut line was ever written whole
        good.append(line)
    if repair and len(good) != sum(1 for line in lines if line.strip()):
        write_text_atomic(path, "".join(line + "\n" for line in good))
    return out


def _column_values(ds, column: str) -> list:
    table = ds.select_columns([column]).with_format("arrow")
    return [v for batch in table.iter(batch_size=READ_BATCH) for v in batch.column(column).to_pylist()]


def _filled(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) or isinstance(value, list) and bool(value)


def plan_rows(ds, cfg: CaptionConfig, records: dict[tuple[str, int], str]) -> RowPlan:
    levels = levels_of(cfg.mode)
    columns = {lv: (cfg.caption_column if lv == "caption" else lv) for lv in levels}
    p = RowPlan(todo={lv: [] for lv in levels}, columns=columns, rows=len(ds))
    for level, col in columns.items():
        have = _column_values(ds, col) if col in ds.column_names else [None] * len(ds)
        for row, value in enumerate(have):
            if not cfg.overwrite and ((level, row) in records or _filled(value)):
                p.existing += 1
            else:
                p.todo[level].append(row)
    return p


def open_source(cfg: CaptionConfig):
    from library.data.hfdata import check_columns, open_dataset

    ds = open_dataset(cfg.dataset_path, "", cfg.dataset_split)
    check_columns(ds, cfg.image_column, "", f"dataset {cfg.dataset_path!r}", cfg.dataset_path)
    return ds


def caption_dataset(cfg: CaptionConfig, *, progress: bool, dry_run: bool, out: Callable[[str], None]) -> RowPlan:
    import datasets

    quiet = not progress and not datasets.utils.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()  # its "Generating ..." / "Saving the dataset" bars follow --no-progress
    try:
        return _caption_dataset(cfg, progress=progress, dry_run=dry_run, out=out)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _caption_dataset(cfg: CaptionConfig, *, progress: bool, dry_run: bool, out: Callable[[str], None]) -> RowPlan:
    ds = open_source(cfg)
    output = Path(cfg.output_dataset).expanduser()
    records_file = record_path(output)
    records = read_records(records_file, repair=not dry_run)
    p = plan_rows(ds, cfg, records)
    per_level = " (" + ", ".join(f"{len(v)} {k}" for k, v in p.todo.items()) + ")" if cfg.mode == "levels" else ""
    out(f"{p.rows} rows in {cfg.dataset_path}: {p.total} captions to write{per_level}, {p.existing} already there "
        f"and kept (the record of this run: {records_file.name})")
    if dry_run:
        return p
    if p.total:
        _caption_rows(ds, cfg, p, records_file, progress, out)
        records = read_records(records_file)
    if p.total or not output.exists():
        _write_dataset(ds, p, records, output)
        out(f"wrote {output} (columns {', '.join(p.columns.values())}); train on it with data.dataset_path")
    for row, why in p.skipped:
        out(f"  skipped {row}: {why}")
    return p


def _caption_rows(ds, cfg: CaptionConfig, p: RowPlan, records_file: Path, progress: bool,
                  out: Callable[[str], None]) -> None:
    """Caption the planned rows batch by batch, appending each caption to the record file (fsynced per batch)."""
    from tqdm import tqdm

    from library.data.hfdata import _image_value
    from library.data.images import BadImage, load_image

    captioners, fits, tagger = load_captioners(cfg, [lv for lv, todo in p.todo.items() if todo], progress)
    table = ds.select_columns([cfg.image_column]).with_format("arrow")
    base = Path(cfg.dataset_path).expanduser()
    base = base if base.is_dir() else base.parent
    label = Path(cfg.dataset_path).name

    def cells(rows: list[int]) -> list:
        values = table[rows].column(cfg.image_column).to_pylist()  # read here, decoded in the pool
        return [_image_value(v, base) for v in values]

    def decode(cell, fit):
        data, path = cell
        try:
            if data is None and path is None:
                return "no image in this row"
            return on_white(load_image(data if data is not None else path, fit=fit))
        except BadImage as e:
            return str(e)

    written = 0
    bad: dict[str, str] = {}
    records_file.parent.mkdir(parents=True, exist_ok=True)
    with open(records_file, "a", encoding="utf-8") as f, tqdm(total=p.total, unit="caption", disable=not progress,
                                                              file=sys.stderr, desc="captioning") as bar:
        for level, rows in p.todo.items():
            for done, imgs, unreadable in batches(rows, cfg.batch_size, fits.get(level, (0, 0)), cells, decode):
                bad.update((f"{label}[{r}]", why) for r, why in unreadable)
                for row, caption in zip(done, captioners[level](imgs) if imgs else []):
                    if not caption.strip():
                        p.skipped.append((f"{label}[{row}]", empty_reason(level, captioners[level] is tagger)))
                        continue
                    written += 1
                    f.write(json.dumps({"row": row, "level": level, "caption": caption}, ensure_ascii=False) + "\n")
                    kill_point("caption", written)
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(done) + len(unreadable))
    p.skipped.extend(bad.items())
    out(f"captioned {written} rows" + (f"; {len(p.skipped)} skipped (listed below)" if p.skipped else ""))


def _write_dataset(ds, p: RowPlan, records: dict[tuple[str, int], str], output: Path) -> None:
    """The source with the caption columns set from the records (rows without a record keep their value, or '')."""
    for level, col in p.columns.items():
        old = _column_values(ds, col) if col in ds.column_names else [None] * len(ds)
        if col in ds.column_names:
            if getattr(ds.features[col], "dtype", None) not in ("string", "large_string"):
                raise DataError(f"column {col!r} of {p.rows}-row dataset holds {ds.features[col]}, not text: write "
                                "the captions to another column (caption.caption_column)")
            ds = ds.remove_columns(col)
        ds = ds.add_column(col, [records.get((level, r), old[r] or "") for r in range(len(old))])
    with atomic_path(output) as tmp:
        ds.save_to_disk(str(tmp))
