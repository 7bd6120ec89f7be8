"""Merge benchmark: a block-weighted merge of two full-size SDXL-shaped fp16 checkpoints (~6.9 GB each).

    python bench/bench_merge.py [--dir DIR] [--keep] [--gb N]

Writes two single files with the released SDXL key set and shapes (UNet, VAE, both text encoders, from the bundled
configs on the meta device) filled with random fp16 values, then measures, each both warm (the inputs in the page
cache) and cold (the inputs evicted from it with posix_fadvise(POSIX_FADV_DONTNEED), no root needed; the share of
each file still cached is checked with mincore and reported):
- the time just to read both files (`cat A B > /dev/null`);
- `merge_models.py` (weighted sum, GRAD_V block alphas, fp16 single-file output, fsynced as always) in a child
  process: wall time, peak resident memory (the child's ru_maxrss) and, from `--timings`, the busy time of the read,
  merge and write stages and of the final fsync, and the merge's wall time without the interpreter's and torch's
  start-up (`write_merge_wall_s`); cold once more with `--no-prefetch`, to show what reading the inputs ahead
  during that start-up gains.
Targets: peak RSS < 1.5 GB, wall time < 2x the read time. Also reported: the time to write and fsync one file of the
output's size with `dd` (with O_DIRECT, as the merge writes where the file system allows, and buffered), since the
merge must write one: where that write alone takes longer than twice the read time, the target is out of reach on
that disk whatever the merge does; and the start-up the merge cannot avoid, `python -c "import torch"` (wall and CPU
seconds), with the load average before and after, since on a shared machine both times stretch with the load.
Needs 30 GB free in DIR (default: a temporary folder beside the repository), removed afterwards unless --keep.
`--gb N` keeps only a part of the keys (about N GB per file) for a quick run. Prints JSON and writes it to
bench/results/merge.json (a `--gb` run under "subset_runs", beside the full-size result). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from library.fileio import write_text_atomic  # noqa: E402
from library.merge.prefetch import cached_fraction  # noqa: E402

NEED_BYTES = 30 * 1024**3
RESULTS = Path(__file__).resolve().parent / "results"
POOL = 1 << 26  # one random fp16 pool of 64 Mi values (128 MiB), sliced per tensor: generating 7 G values is slow


def sdxl_specs() -> dict[str, tuple[int, ...]]:
    """Every single-file key of a released SDXL base checkpoint with its shape (meta-device models, key maps)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.merge.stream import TE_PARTS, folder_parts, read_json
    from library.models import keymaps_clip as kc
    from library.models.configs import bundled_config_dir
    from library.models.keymaps import to_ldm

    folder = bundled_config_dir("sdxl")
    _, parts = folder_parts(folder, "sdxl", with_weights=False)
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(read_json(folder / "unet" / "config.json")),
            "vae": AutoencoderKL.from_config(read_json(folder / "vae" / "config.json")),
        }
        for name, _, _ in TE_PARTS["sdxl"]:
            cfg = read_json(folder / name / "config.json")
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            modules[name] = cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    specs: dict[str, tuple[int, ...]] = {}
    for part in parts:
        module = modules[part.name]
        sd = kc.te_state_dict(module) if part.name.startswith("text_encoder") else module.state_dict()
        specs.update({k: tuple(v.shape) for k, v in to_ldm(sd, part.keymap).items()})
    return specs


def write_random(path: Path, specs: dict[str, tuple[int, ...]], seed: int) -> None:
    from library.merge.writers import SafetensorsWriter

    pool = torch.randn(POOL, generator=torch.Generator().manual_seed(seed)).half()
    w = SafetensorsWriter(path, {k: (torch.float16, s) for k, s in specs.items()})
    pos = 0
    for key, shape in specs.items():
        n = 1
        for d in shape:
            n *= d
        chunks, left = [], n
        while left:  # a tensor larger than the pool wraps around it
            take = min(left, POOL - pos)
            chunks.append(pool[pos:pos + take])
            pos, left = (pos + take) % POOL, left - take
        w.write(key, torch.cat(chunks).reshape(shape) if len(chunks) > 1 else chunks[0].reshape(shape))
        pos = (pos + 7919) % POOL  # vary the alignment between tensors
    w.close()


def subset(specs: dict[str, tuple[int, ...]], gb: float) -> dict[str, tuple[int, ...]]:
    """About `gb` GB of fp16 keys (file order kept), with the text-encoder keys that mark the family."""
    keep: dict[str, tuple[int, ...]] = {}
    total = 0
    for key, shape in specs.items():
        nbytes = 2 * _numel(shape)
        marker = key.startswith("conditioner.embedders.1.") and not any(
            k.startswith("conditioner.embedders.1.") for k in keep)
        if marker or total + nbytes <= gb * 1e9:
            keep[key] = shape
            total += nbytes
    return keep


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def evict(*paths: Path) -> None:
    """Drop the files' pages from the page cache (clean pages only: the files were fsynced when written)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_import_torch() -> dict[str, float]:
    """Wall and CPU seconds of `python -c "import torch"`: start-up that every merge pays before reading a byte."""
    before = os.times()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def time_cat(*paths: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


# Linux carries a process's peak RSS (ru_maxrss) across exec, and a child forked from this benchmark (which holds
# torch and a 128 MiB random pool) would report this process's RSS as its own peak. A small launcher forks the merge
# as a grandchild, whose peak starts from the launcher's few MB, and reports its ru_maxrss (KiB) from wait4.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print("maxrss_kib", usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_merge(a: Path, b: Path, out: Path, *extra: str) -> dict[str, float]:
    """One merge in a child process: its wall time, peak RSS (its own ru_maxrss, from wait4) and stage timings."""
    cmd = [sys.executable, str(ROOT / "merge_models.py"), "--merge.model_a", str(a), "--merge.model_b", str(b),
           "--merge.alpha", "0.5", "--merge.block_alphas", "GRAD_V", "--output.path", str(out),
           "--output.precision", "fp16", "--no-progress", "--timings", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"merge failed ({proc.returncode}):\n{proc.stderr}")
    err = proc.stderr
    maxrss_kib = int(next(ln for ln in err.splitlines() if ln.startswith("maxrss_kib ")).split()[1])
    line = next(ln for ln in err.splitlines() if ln.startswith("timings "))
    timings = json.loads(line[len("timings "):])
    return {"wall_s": wall, **timings, "rss_gb": maxrss_kib * 1024 / 1e9, "out_bytes": out.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where the ~21 GB of files go (default: a temp folder in the repo)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--gb", type=float, default=0.0, help="only about this many GB per file (a quick run; no JSON)")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else ROOT
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    need = NEED_BYTES if not args.gb else int(4 * args.gb * 1e9)
    if free < need:
        print(f"skipped: {free / 1024**3:.1f} GB free in {base}, the benchmark needs {need / 1024**3:.0f} GB")
        return 0
    load_start = [round(x, 2) for x in os.getloadavg()]
    import_torch = time_import_torch()
    work = Path(tempfile.mkdtemp(prefix=".bench-merge-", dir=base))
    try:
        specs = sdxl_specs()
        if args.gb:
            specs = subset(specs, args.gb)
        a, b, out = work / "a.safetensors", work / "b.safetensors", work / "merged.safetensors"
        t0 = time.perf_counter()
        write_random(a, specs, 1)
        write_random(b, specs, 2)
        gen_s = time.perf_counter() - t0
        size = a.stat().st_size
        runs: dict[str, dict[str, float]] = {}
        peak_rss = 0.0
        for state in ("warm", "cold", "cold_no_prefetch"):
            if state == "warm":
                time_cat(a, b)  # bring both files into the page cache
            else:
                evict(a, b)
            cached_before_read = min(cached_fraction(a), cached_fraction(b))
            read_s = time_cat(a, b)
            if state != "warm":
                evict(a, b)
            cached_before_merge = min(cached_fraction(a), cached_fraction(b))
            merge = run_merge(a, b, out, *(["--no-prefetch"] if state == "cold_no_prefetch" else []))
            peak_rss = max(peak_rss, merge["rss_gb"])
            out.unlink()
            runs[state] = {
                "inputs_cached_before_read": round(cached_before_read, 3),
                "inputs_cached_before_merge": round(cached_before_merge, 3),
                "read_both_s": round(read_s, 2),
                "merge_wall_s": round(merge["wall_s"], 2),
                "wall_over_read": round(merge["wall_s"] / read_s, 2),
                "startup_s": round(merge["wall_s"] - merge["write_merge_wall_s"], 2),
                "merge_without_startup_s": round(merge["write_merge_wall_s"], 2),
                "without_startup_over_read": round(merge["write_merge_wall_s"] / read_s, 2),
                "stage_busy_s": {k: round(merge[k], 2) for k in ("read_s", "compute_s", "write_s")},
                "direct_io_s": round(merge.get("direct_io_s", 0.0), 2),  # the O_DIRECT writes (their own thread)
                # A floor for this run: no output byte can be written before torch is imported, and the disk took
                # direct_io_s for the writes alone. Over 2x the read time, the target is out of reach here.
                "startup_plus_io_s": round(merge["wall_s"] - merge["write_merge_wall_s"]
                                           + merge.get("direct_io_s", 0.0), 2),
                "startup_plus_io_over_read": round((merge["wall_s"] - merge["write_merge_wall_s"]
                                                    + merge.get("direct_io_s", 0.0)) / read_s, 2),
                "fsync_s": round(merge["fsync_s"], 2),
                "fsync_share_of_wall": round(merge["fsync_s"] / merge["wall_s"], 3),
                "peak_rss_gb": round(merge["rss_gb"], 3),
                "direct_write": bool(merge["direct_write"]),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
            print(state, json.dumps(runs[state]), flush=True)
        # The merge also writes (and fsyncs) a file as large as one input: time that alone as the disk's floor.
        zeros = work / "zeros"
        dd_s = {}
        for name, flags in (("direct", ["oflag=direct"]), ("buffered", [])):
            t0 = time.perf_counter()
            subprocess.run(["dd", "if=/dev/zero", f"of={zeros}", "bs=16M", f"count={size // (16 << 20)}", "conv=fsync",
                            "status=none", *flags], check=True)
            dd_s[name] = round(time.perf_counter() - t0, 2)
            zeros.unlink()
        rss_gb = peak_rss
        result = {
            "benchmark": "merge_sdxl_block_weighted_fp16" + (f"_subset_{args.gb}gb" if args.gb else ""),
            "file_gb": round(size / 1e9, 3),
            "tensors": len(specs),
            "generate_s": round(gen_s, 1),
            "warm": runs["warm"],
            "cold": runs["cold"],
            "cold_no_prefetch": runs["cold_no_prefetch"],  # merge_models.py --no-prefetch: what the read-ahead gains
            "write_one_file_fsync_s": dd_s,
            "import_torch": import_torch,
            "peak_rss_gb": round(rss_gb, 3),
            "targets": {"peak_rss_gb_lt": 1.5, "wall_over_read_lt": 2.0},
            "pass_warm": rss_gb < 1.5 and runs["warm"]["wall_over_read"] < 2.0,
            "pass_cold": rss_gb < 1.5 and runs["cold"]["wall_over_read"] < 2.0,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "load_avg_at_start": load_start,
                        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        }
        print(json.dumps(result, indent=2))
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "merge.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        if args.gb:
            old.setdefault("subset_runs", {})[f"{args.gb:g}gb"] = result
            result = old
        elif "subset_runs" in old:
            result["subset_runs"] = old["subset_runs"]
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
