"""Check an image folder or a Hugging Face dataset before training: broken files, duplicates, blur, exposure, captions.

    python check_dataset.py DIR [--json report.json] [--caption-extension .txt] [--quick] [--min-side 512 ...]
    python check_dataset.py DATASET [--split train] [--image-column image] [--caption-column text] [...]

DATASET is what data.dataset_path trains on: a .parquet file, a folder of parquet files, a `save_to_disk` folder, or
an imagefolder (images + metadata.jsonl / metadata.csv); the report then names rows and lists the columns.

Prints a table and exits 0 when nothing blocks training, 1 when something does (unreadable / truncated / zero-byte
images, no captions at all, ...; see library/data/doctor.py for every finding and its severity), 2 on a usage error.
Every threshold of `library.data.doctor.Thresholds` is an option (e.g. `--blur 30`, `--no-require-captions`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from library.cli import main_guard
from library.config.fields import help_of
from library.data.demo import resolve_dataset_ref
from library.data.doctor import Thresholds, format_report, scan
from library.data.doctor_datasets import is_dataset, scan_dataset
from library.fileio import write_text_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="image folder (searched recursively), demo:<variant>, or a Hugging Face dataset "
                               "(parquet file or folder, save_to_disk folder, imagefolder with metadata.jsonl/csv)")
    p.add_argument("--json", help="also write the full report (every finding and per-image statistics) here")
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--quick", action="store_true", help="headers, decode and captions only (what training runs)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--image-column", default="image", help="dataset image column (default image)")
    p.add_argument("--caption-column", default="text", help="dataset caption column (default text; '' = none)")
    p.add_argument("--max-rows", type=int, default=10, help="findings shown per kind on the terminal")
    for f in dataclasses.fields(Thresholds):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_of(f))
        else:
            kind = int if f.type in (int, "int") else float
            p.add_argument(flag, type=kind, default=f.default, help=f"{help_of(f)} (default {f.default})")
    return p.parse_args(argv)


def _progress(i: int, n: int) -> None:
    if i % 50 == 0:
        print(f"\rscanning image {i + 1} of {n}", end="", file=sys.stderr, flush=True)


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    th = Thresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Thresholds)})
    progress = _progress if sys.stderr.isatty() else None
    root = resolve_dataset_ref(args.dir)
    if is_dataset(root):
        report = scan_dataset(str(root), split=args.split, image_column=args.image_column,
                              caption_column=args.caption_column, thresholds=th, quick=args.quick, progress=progress)
    else:
        report = scan(root, caption_extension=args.caption_extension, thresholds=th, quick=args.quick,
                      progress=progress)
    if sys.stderr.isatty():
        print("\r" + " " * 40 + "\r", end="", file=sys.stderr)
    print(format_report(report, max_rows=args.max_rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(report.to_json(), indent=1) + "\n")
        print(f"report written to {args.json}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
