"""How long a `--dry-run` estimate takes, and what it says, for full-size SD1.5 and SDXL.

    python bench/bench_estimate.py [--quick]

Times `estimate_step` (meta-device model from the bundled configs, one fake-tensor training step with FLOP counting)
for SD1.5 LoRA / full fine-tune at 512 px, SD2.1 LoRA at 768 px and SDXL LoRA / full fine-tune at 1024 px (batch 1;
`--quick`: SD1.5 only), then the whole `--dry-run` ladder of changes for SDXL full on a 24 GB card, prints a table and
writes bench/results/estimate.json (`--quick`: estimate-quick.json). Each scenario is a fresh measurement (the
per-process cache is cleared). The machine's load matters: fake-tensor dispatch is CPU-bound Python on one core, so
both wall-clock and this process's CPU seconds are recorded, with the 1-minute load average before and after.
Not part of the test suite.
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
    yield "sd21-lora-r4-fp16-768", EstimateSpec(family="sd2", method="lora", resolution=(768, 768),
                                                mixed_precision="fp16")
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
    from library.estimate.gpus import load_gpus, needed_bytes
    from library.estimate.memory import EstimateSpec
    from library.estimate.step import _MEASURED, estimate_step
    from library.estimate.report import ladder

    import_s = time.perf_counter() - t0
    rows = []
    print(f"{'scenario':<24} {'seconds':>8} {'cpu s':>7} {'peak GiB':>9} {'needs GiB':>10} {'TFLOP':>7}")
    for name, spec in scenarios(args.quick):
        _MEASURED.clear()
        load_before, cpu0 = os.getloadavg()[0], time.process_time()
        e = estimate_step(spec)
        row = dict(scenario=name, seconds=round(e.seconds, 2), cpu_seconds=round(time.process_time() - cpu0, 2),
                   load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2),
                   peak_gib=round(e.peak / 2**30, 3), needed_gib=round(needed_bytes(e.peak) / 2**30, 3),
                   weights_gib=round(e.weights / 2**30, 3), gradients_gib=round(e.gradients / 2**30, 3),
                   optimizer_state_gib=round(e.optimizer_state / 2**30, 3),
                   activations_gib=round(e.activations / 2**30, 3), tflop=round(e.flops / 1e12, 3))
        rows.append(row)
        print(f"{name:<24} {row['seconds']:>8.1f} {row['cpu_seconds']:>7.1f} {row['peak_gib']:>9.2f} "
              f"{row['needed_gib']:>10.2f} {row['tflop']:>7.2f}", flush=True)
    if not args.quick:  # what --dry-run does for a run that does not fit: the ladder, re-estimated step by step
        _MEASURED.clear()
        spec = EstimateSpec(family="sdxl", method="full", resolution=(1024, 1024), mixed_precision="fp16")
        t0, cpu0, load_before = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        steps = ladder(estimate_step(spec, "as configured"), load_gpus(keys=["rtx4090"]))
        rows.append(dict(scenario="sdxl-full-fp16-ladder-24gb", seconds=round(time.perf_counter() - t0, 2),
                         cpu_seconds=round(time.process_time() - cpu0, 2), load_before=round(load_before, 2),
                         load_after=round(os.getloadavg()[0], 2), measured=sum(1 for e in steps if e.seconds > 1),
                         steps=[dict(label=e.label, needed_gib=round(needed_bytes(e.peak) / 2**30, 3))
                                for e in steps]))
        print(f"{'sdxl full ladder 24 GB':<24} {rows[-1]['seconds']:>8.1f} {rows[-1]['cpu_seconds']:>7.1f}  "
              f"{len(steps)} estimates, {rows[-1]['measured']} measured", flush=True)
    out = dict(machine=platform.platform(), cpus=os.cpu_count(), load=os.getloadavg(),
               note=("2 cores shared with other engineers' tests while this ran: see each row's load_before / "
                     "load_after (1-minute load average) and cpu_seconds (this process's CPU time)"),
               import_seconds=round(import_s, 2), results=rows)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("estimate-quick.json" if args.quick else "estimate.json")
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
