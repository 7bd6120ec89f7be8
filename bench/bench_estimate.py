"""How long a `--dry-run` estimate takes, and what it says, for full-size SD1.5 and SDXL.

    python bench/bench_estimate.py [--quick]

Times `estimate_step` (meta-device model from the bundled configs, one fake-tensor training step with FLOP counting)
for SD1.5 LoRA / full fine-tune at 512 px and SDXL LoRA / full fine-tune at 1024 px (batch 1; `--quick`: SD1.5 only),
prints a table and writes bench/results/estimate.json (`--quick`: estimate-quick.json). The machine's load matters:
fake-tensor dispatch is CPU-bound Python, one core. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def scenarios(quick: bool):
    from library.estimate.memory import EstimateSpec

    yield "sd15-lora-r4-fp16", EstimateSpec(family="sd1", method="lora", resolution=(512, 512), mixed_precision="fp16")
    yield "sd15-full-adamw-fp32", EstimateSpec(family="sd1", method="full", resolution=(512, 512),
                                               mixed_precision="no", cache_latents=True, cache_text_outputs=True)
    if not quick:
        yield "sdxl-lora-r4-fp16", EstimateSpec(family="sdxl", method="lora", resolution=(1024, 1024),
                                                mixed_precision="fp16")
        yield "sdxl-full-adamw-fp32", EstimateSpec(family="sdxl", method="full", resolution=(1024, 1024),
                                                   mixed_precision="no", cache_latents=True, cache_text_outputs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SD1.5 only")
    args = parser.parse_args()
    t0 = time.perf_counter()
    from library.estimate.gpus import needed_bytes
    from library.estimate.memory import estimate_step

    import_s = time.perf_counter() - t0
    rows = []
    print(f"{'scenario':<24} {'seconds':>8} {'peak GiB':>9} {'needs GiB':>10} {'TFLOP':>7}")
    for name, spec in scenarios(args.quick):
        e = estimate_step(spec)
        row = dict(scenario=name, seconds=round(e.seconds, 2), peak_gib=round(e.peak / 2**30, 3),
                   needed_gib=round(needed_bytes(e.peak) / 2**30, 3), weights_gib=round(e.weights / 2**30, 3),
                   gradients_gib=round(e.gradients / 2**30, 3),
                   optimizer_state_gib=round(e.optimizer_state / 2**30, 3),
                   activations_gib=round(e.activations / 2**30, 3), tflop=round(e.flops / 1e12, 3))
        rows.append(row)
        print(f"{name:<24} {row['seconds']:>8.1f} {row['peak_gib']:>9.2f} {row['needed_gib']:>10.2f} "
              f"{row['tflop']:>7.2f}", flush=True)
    out = dict(machine=platform.platform(), cpus=os.cpu_count(), load=os.getloadavg(),
               import_seconds=round(import_s, 2), results=rows)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("estimate-quick.json" if args.quick else "estimate.json")
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
