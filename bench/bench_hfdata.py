"""Memory of indexing a large parquet dataset (issue 18: "index once, decode per item", never loaded whole).

    python bench/bench_hfdata.py [--rows 100000] [--quick]

Writes a parquet file of N rows once (an `image` {bytes, path} struct column of small noise PNGs, ~3 KB each, three
aspect ratios, and a `text` column; written 1,000 rows per row group) into `<cache>/bench/`, then in fresh
processes measures, by sampling /proc/self/status every 10 ms:
- `index (first)`: `dataset_specs` + `index_datasets` with data.dataset_path = the file and an empty datasets cache
  (the datasets library converts the file to its memory-mapped Arrow cache, then every row's header is read);
- `index (cached)`: the same again, the Arrow cache already there (what every later run pays);
- `read_table`: `pyarrow.parquet.read_table` of the whole file: what loading it whole would hold;
- `decode`: 1,000 random rows decoded through the index (`load_item_image`), per row.
RssAnon (anonymous memory: what the process holds) is the figure that matters; RssFile (pages of the memory-mapped
Arrow file the kernel may drop at any time) is reported beside it. Writes bench/results/hfdata.json (`--quick`:
10,000 rows, hfdata-quick.json). Not part of the test suite.
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
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.fileio import atomic_path, write_text_atomic  # noqa: E402
from library.paths import cache_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ((32, 32), (48, 32), (32, 48))
MIB = 2 ** 20


def make_parquet(rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    path = cache_dir() / "bench" / f"hfdata-{rows}.parquet"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string())])
    with atomic_path(path) as tmp, pq.ParquetWriter(str(tmp), schema) as w:
        for start in range(0, rows, 1000):
            images, texts = [], []
            for i in range(start, min(rows, start + 1000)):
                wd, ht = SIDES[i % 3]
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (ht, wd, 3), dtype=np.uint8)).save(buf, "PNG")
                images.append({"bytes": buf.getvalue(), "path": None})
                texts.append(f"row {i}, tag{i % 97}, tag{i % 13}")
            w.write_table(pa.table({"image": images, "text": texts}, schema=schema))
    return path


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Peak:
    """Peak RssAnon / RssFile while the block runs, minus the values at its start."""

    def __enter__(self):
        self.start, self.peak, self.stop = _status(), _status(), False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _poll(self):
        while not self.stop:
            now = _status()
            self.peak = {k: max(self.peak[k], now[k]) for k in now}
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop = True
        self.thread.join()
        end = _status()
        self.peak = {k: max(self.peak[k], end[k]) for k in end}
        self.result = {"seconds": round(self.seconds, 2),
                       "peak_anon_mib": round((self.peak["RssAnon"] - self.start["RssAnon"]) / MIB, 1),
                       "held_anon_mib": round((end["RssAnon"] - self.start["RssAnon"]) / MIB, 1),
                       "peak_file_mib": round((self.peak["RssFile"] - self.start["RssFile"]) / MIB, 1)}


def child(mode: str, path: str) -> dict:
    """One measurement in this (fresh) process; the heavy imports happen before the baseline."""
    import datasets  # noqa: F401
    import pyarrow.parquet as pq

    from library.config.data import DataConfig
    from library.data.dataset import dataset_specs, index_datasets, load_item_image

    if mode == "read_table":
        with Peak() as p:
            table = pq.read_table(path)
        del table
        return p.result
    cfg = DataConfig(dataset_path=path, resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    with Peak() as p:
        index = index_datasets(dataset_specs(cfg, 512), cfg)
    out = {**p.result, "items": len(index.items)}
    rng = np.random.default_rng(1)
    rows = rng.integers(0, len(index.items), 1000)
    t = time.perf_counter()
    for r in rows:
        load_item_image(index.items[int(r)], index.items[int(r)].placement.resized)
    out["decode_ms_per_row"] = round(1000 * (time.perf_counter() - t) / len(rows), 3)
    return out


def run_child(mode: str, path: Path, hf_cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--quick", action="store_true", help="10,000 rows")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    rows = 10_000 if args.quick else args.rows
    path = make_parquet(rows)
    with tempfile.TemporaryDirectory() as tmp:
        first = run_child("index", path, Path(tmp) / "hf")
        cached = run_child("index", path, Path(tmp) / "hf")
        arrow = sum(f.stat().st_size for f in (Path(tmp) / "hf").rglob("*.arrow"))
        whole = run_child("read_table", path, Path(tmp) / "hf")
    size = path.stat().st_size
    result = {
        "rows": rows, "parquet_mib": round(size / MIB, 1), "arrow_cache_mib": round(arrow / MIB, 1),
        "index_first": first, "index_cached": cached, "read_table_whole": whole,
        "ratios": {"index_first_peak_anon / parquet": round(first["peak_anon_mib"] * MIB / size, 3),
                   "index_cached_peak_anon / parquet": round(cached["peak_anon_mib"] * MIB / size, 3),
                   "index_cached_peak_anon / read_table_peak_anon":
                       round(cached["peak_anon_mib"] / max(whole["peak_anon_mib"], 0.1), 3),
                   "index_cached_held_anon_bytes_per_row": round(cached["held_anon_mib"] * MIB / rows)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"{rows} rows, parquet {result['parquet_mib']} MiB, arrow cache {result['arrow_cache_mib']} MiB")
    for name, r in (("index (first)", first), ("index (cached)", cached), ("read_table", whole)):
        print(f"  {name:<15} {r['seconds']:>7.2f} s  peak anon {r['peak_anon_mib']:>7.1f} MiB  held anon "
              f"{r['held_anon_mib']:>7.1f} MiB  peak file-backed {r['peak_file_mib']:>7.1f} MiB")
    print(f"  decode: {cached['decode_ms_per_row']} ms per random row")
    for k, v in result["ratios"].items():
        print(f"  {k}: {v}")
    out = Path(args.out) if args.out else RESULTS / ("hfdata-quick.json" if args.quick else "hfdata.json")
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
