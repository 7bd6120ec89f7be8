"""Indexing benchmark: a folder of 100,000 small images -> DataIndex with buckets, in bounded time and memory.

    python bench/bench_index.py [--images 100000] [--captions] [--links] [--compare-rev REV] [--out FILE]

Writes N files from a handful of distinct tiny PNG / JPEG byte strings (eight sizes and aspect ratios, so several
buckets exist; the same bytes are copied, so generation costs little more than the file creates) into a temporary
folder, then times `library.data.dataset.index_datasets` (directory scan, header reads, captions, bucket placement)
in a fresh child process, so its peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is the indexing's alone.
Reports seconds, images/s, per-image microseconds, peak RSS and RSS growth per image, and the bucket counts
(`--compare-rev`: also the same figures for an older revision's library, on the same folder); writes
bench/results/index.json. The machine's load average is recorded: on a shared machine, seconds vary with it. Not part of the test suite (tests/test_load_index.py checks counts and memory).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
# (width, height, format): small files whose headers give eight distinct aspect ratios.
SHAPES = ((64, 64, "PNG"), (96, 64, "JPEG"), (64, 96, "PNG"), (128, 64, "JPEG"), (64, 128, "PNG"),
          (80, 64, "JPEG"), (64, 80, "PNG"), (112, 48, "JPEG"))


def image_bytes() -> list[tuple[bytes, str]]:
    """One encoded file per shape (a flat colour compresses to a few hundred bytes)."""
    out = []
    for i, (w, h, fmt) in enumerate(SHAPES):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (30 * i, 255 - 30 * i, 90)).save(buf, format=fmt)
        out.append((buf.getvalue(), ".png" if fmt == "PNG" else ".jpg"))
    return out


def write_dataset(folder: Path, n: int, captions: bool = False, links: bool = False) -> dict[tuple[int, int], int]:
    """N image files (round-robin over SHAPES) and, with `captions`, one caption file each; returns size -> count.

    `links`: each distinct file is written once and the others are hard links to it (same bytes, one directory
    entry each). Indexing still opens and reads every path; creating and deleting 100k links takes about a second
    where 100k real small files took minutes to delete on a busy ext4 disk (measured 103 s), which matters in tests.
    """
    folder.mkdir(parents=True, exist_ok=True)
    blobs = image_bytes()
    counts: dict[tuple[int, int], int] = {}
    for i in range(n):
        k = i % len(blobs)
        data, ext = blobs[k]
        path = folder / f"{i:06d}{ext}"
        text = f"image {i}, shape {k}" if not links else f"shape {k}"
        for p, content, first in ((path, data, folder / f"{k:06d}{ext}"),
                                  *(((path.with_suffix(".txt"), text.encode(), folder / f"{k:06d}.txt"),)
                                    if captions else ())):
            if links and i >= len(blobs):
                os.link(first, p)
            else:
                p.write_bytes(content)
        size = SHAPES[k][:2]
        counts[size] = counts.get(size, 0) + 1
    return counts


# Run in a child: imports, builds the index, prints one JSON line with timings and RSS.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
from library.config.data import DataConfig
from library.data.dataset import dataset_specs, index_datasets
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = DataConfig(train_data_dir=sys.argv[1], resolution=128, min_bucket_reso=64, max_bucket_reso=256)
t0 = time.perf_counter()
index = index_datasets(dataset_specs(cfg, 64), cfg)
seconds = time.perf_counter() - t0
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
buckets = {}
for it in index.items:
    b = "%dx%d" % it.placement.bucket
    buckets[b] = buckets.get(b, 0) + 1
print(json.dumps({"images": len(index.items), "skipped": len(index.skipped), "seconds": seconds,
                  "rss_before_kib": rss0, "peak_rss_kib": rss1, "buckets": buckets}))
"""


def measure(folder: Path, root: Path = ROOT) -> dict:
    """Index `folder` in a fresh Python process with the `library` package under `root`; its result as a dict."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(root)], capture_output=True, text=True,
                          check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def library_at(rev: str, dest: Path) -> Path:
    """The `library` package as of git revision `rev`, extracted under `dest` (for before / after figures)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "library"], capture_output=True, check=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=blob, check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--captions", action="store_true", help="write a caption file per image too")
    ap.add_argument("--links", action="store_true", help="hard links to 8 distinct files instead of N real files")
    ap.add_argument("--compare-rev", default="", help="also index the same folder with the library of this git revision")
    ap.add_argument("--out", default=str(RESULTS / "index.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdtk-bench-index-") as tmp:
        folder = Path(tmp) / "images"
        t0 = time.perf_counter()
        write_dataset(folder, args.images, args.captions, args.links)
        gen_s = time.perf_counter() - t0
        r = measure(folder)
        before = measure(folder, library_at(args.compare_rev, Path(tmp) / "old")) if args.compare_rev else None
    n = r["images"]
    growth_kib = r["peak_rss_kib"] - r["rss_before_kib"]
    result = {
        "images": n, "captions": args.captions, "hard_links": args.links, "skipped": r["skipped"], "generate_seconds": round(gen_s, 2),
        "index_seconds": round(r["seconds"], 2), "images_per_second": round(n / r["seconds"]),
        "us_per_image": round(1e6 * r["seconds"] / n, 1), "peak_rss_mib": round(r["peak_rss_kib"] / 1024, 1),
        "rss_growth_mib": round(growth_kib / 1024, 1), "rss_growth_bytes_per_image": round(growth_kib * 1024 / n),
        "buckets": r["buckets"],
        "before": None if before is None else {
            "rev": args.compare_rev, "index_seconds": round(before["seconds"], 2),
            "rss_growth_mib": round((before["peak_rss_kib"] - before["rss_before_kib"]) / 1024, 1)},
        "load_average_1min": round(os.getloadavg()[0], 1), "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                             "platform": platform.platform()},
        "command": "python bench/bench_index.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
