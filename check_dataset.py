"""Check an image folder before training: broken files, duplicates, blur, exposure, captions.

    python check_dataset.py DIR [--json report.json] [--caption-extension .txt] [--quick] [--min-side 512 ...]

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
from library.fileio import write_text_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="image folder (searched recursively), or demo:<variant>")
    p.add_argument("--json", help="also write the full report (every finding and per-image statistics) here")
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--quick", action="store_true", help="headers, decode and captions only (what training runs)")
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
    report = scan(resolve_dataset_ref(args.dir), caption_extension=args.caption_extension, thresholds=th,
                  quick=args.quick, progress=_progress if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        print("\r" + " " * 40 + "\r", end="", file=sys.stderr)
    print(format_report(report, max_rows=args.max_rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(report.to_json(), indent=1) + "\n")
        print(f"report written to {args.json}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
