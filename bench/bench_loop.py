"""Training-loop benchmark: steady-state seconds per step and the loop's overhead on the tiny model.

    python bench/bench_loop.py [--steps 60] [--threads 1]

For 64 and 128 px with cached latents, a short warm-up run, then a measured run of train_native.py's method.
Overhead = share of the training steps' wall time spent outside UNet forward + backward + optimizer step (data,
noise, text conditioning, logging, bookkeeping). Target: < 5 %. Writes bench/results/loop.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(resolution: int, steps: int, workdir: Path) -> dict:
    from library.config.core import load_config
    from library.config.run import RunConfig
    from library.training.run import run_training
    from library.methods.native import make_method

    def cfg(n: int, name: str) -> RunConfig:
        return load_config(RunConfig, {
            "model": {"pretrained_model_name_or_path": "tiny:sd15"},
            "data": {"train_data_dir": "demo:shapes", "resolution": resolution, "batch_size": 4,
                     "min_bucket_reso": 64, "max_bucket_reso": 2 * resolution, "cache_latents": True,
                     "num_workers": 0},
            "train": {"max_train_steps": n, "seed": 0},
            "optimizer": {"learning_rate": 1e-4},
            "save": {"output_dir": str(workdir / name), "save_state": False, "save_precision": "fp32"},
            "log": {"progress_bar": False, "log_with": "none"},
        }, source="bench")

    warm = cfg(10, f"warm{resolution}")
    run_training(warm, make_method(warm), script="bench")
    c = cfg(steps, f"run{resolution}")
    r = run_training(c, make_method(c), script="bench")
    t = r.timings
    return {"resolution": resolution, "steps": r.steps, "seconds_per_step": t["compute"] / r.steps,
            "model_seconds_per_step": t["model"] / r.steps, "overhead_share": 1.0 - t["model"] / t["compute"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(res, args.steps, Path(tmp)) for res in (64, 128)]
    print(f"{'px':>5} {'s/step':>9} {'model s/step':>13} {'overhead':>9}")
    for r in rows:
        print(f"{r['resolution']:>5} {r['seconds_per_step']:>9.4f} {r['model_seconds_per_step']:>13.4f} "
              f"{100 * r['overhead_share']:>8.2f}%")
    out = Path(__file__).resolve().parent / "results" / "loop.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
