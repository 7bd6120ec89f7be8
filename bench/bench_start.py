"""Start-up benchmark: wall seconds of a one-step LoRA run on the tiny model, process start to exit.

    python bench/bench_start.py [--repeat 3]

A fresh `python train_lora.py` for one step (cached latents of the 60 demo images, no samples, no resume state): the
time a user waits before training starts, plus one 0.5 s step and the save. Compared, in the same run, with
`python -c "import torch"` (the floor any PyTorch trainer pays) and with the same run when bitsandbytes is imported at
start-up, as diffusers and peft do when library/lean.py does not block it. Medians of `--repeat` runs each.
Writes bench/results/start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[network]
network_dim = 8
[data]
train_data_dir = "demo:shapes"
resolution = 64
batch_size = 4
min_bucket_reso = 64
max_bucket_reso = 128
cache_latents = true
num_workers = 0
[train]
cpu_threads = 1
max_train_steps = 1
[save]
output_dir = "{out}"
save_state = false
[log]
log_with = "none"
progress_bar = false
"""
RUN = "import runpy, sys; sys.argv = ['train_lora.py', '--config', {cfg!r}]; runpy.run_path('train_lora.py', run_name='__main__')"
EAGER = "import library.lean; library.lean.UNUSED_AT_START = (); "  # what start-up was before library/lean.py


def timed(code: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "run.toml"
        cfg.write_text(CONFIG.format(out=Path(tmp) / "out"))
        run = RUN.format(cfg=str(cfg))
        variants = {"import torch": "import torch", "one-step run": run,
                    "one-step run, bitsandbytes imported at start": EAGER + run}
        timed(run)  # warm the page cache and the tiny-model cache
        times = {name: [] for name in variants}
        for _ in range(args.repeat):  # interleaved, so a change in machine load hits every variant alike
            for name, code in variants.items():
                times[name].append(timed(code))
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "cpus": os.cpu_count(), "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        "repeat": args.repeat, "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 2) for k, v in med.items()},
        "run_over_import_torch": round(med["one-step run"] / med["import torch"], 2),
        "eager_bitsandbytes_over_lean": round(med["one-step run, bitsandbytes imported at start"]
                                              / med["one-step run"], 3),
    }
    for name, v in med.items():
        print(f"{name:<48} {v:6.2f} s")
    print(f"one-step run / import torch: {result['run_over_import_torch']}x; "
          f"with bitsandbytes at start: {result['eager_bitsandbytes_over_lean']}x the lean start")
    out = REPO / "bench" / "results" / "start.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
