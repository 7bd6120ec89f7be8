"""Check that each card-size preset in configs/ fits its card, by the --dry-run estimate (no weights needed).

    python tools/check_presets.py [--write bench/results/presets.json]

A preset file is `configs/<sd15|sdxl>_<N>gb_lora.toml`; its memory need (peak tensor memory + the CUDA/allocator
allowance of library/estimate/gpus.py) must be at most N GB. Prints a table; exits 1 if a preset does not fit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    from library.config.core import load_config
    from library.estimate.gpus import needed_bytes
    from library.estimate.step import estimate_step
    from library.estimate.report import spec_from_sections
    from library.models.configs import bundled_config_for
    from library.methods.lora import CONFIG_CLASS

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", default="", help="also write the rows as JSON to this file")
    ap.add_argument("--only", default="", help="check only presets whose file name contains this, e.g. sdxl")
    args = ap.parse_args()
    rows, ok = [], True
    for path in sorted((REPO / "configs").glob(f"*{args.only}*gb_lora.toml")):
        m = re.match(r"(sd15|sdxl)_(\d+)gb_lora", path.stem)
        family, card_gb = ("sd1" if m.group(1) == "sd15" else "sdxl"), int(m.group(2))
        cfg = load_config(CONFIG_CLASS, path)
        spec = spec_from_sections("lora", family, bundled_config_for(family, "epsilon"), cfg.train, cfg.optimizer,
                                  cfg.data, network=cfg.network)
        t = time.perf_counter()
        est = estimate_step(spec, path.stem)
        need = needed_bytes(est.peak) / 2**30
        fits = need <= card_gb
        ok &= fits
        rows.append({"preset": path.name, "card_gb": card_gb, "needed_gib": round(need, 2),
                     "peak_tensor_gib": round(est.peak / 2**30, 2), "fits": fits,
                     "seconds": round(time.perf_counter() - t, 1)})
        print(f"{path.name:<24} needs {need:6.2f} GiB of {card_gb:>2} GB  {'fits' if fits else 'DOES NOT FIT'}",
              flush=True)
    if args.write:
        Path(args.write).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
