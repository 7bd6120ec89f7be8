"""Write an embedded tiny test model as a diffusers folder.

    python -m library.tiny --family sd15 --out tiny-sd15 [--seed 0] [--prediction epsilon|v_prediction]

The folder loads offline with `StableDiffusionPipeline.from_pretrained` (sd15, sd2),
`StableDiffusionXLPipeline.from_pretrained` (sdxl) or `StableDiffusion3Pipeline.from_pretrained` (sd3), and anywhere
a model path is accepted.
"""

from __future__ import annotations

import argparse
import sys

from library.cli import main_guard

FAMILIES = {"sd15": "sd1", "sd1": "sd1", "sd2": "sd2", "sd21": "sd2", "sdxl": "sdxl", "sd3": "sd3"}


@main_guard
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m library.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES), help="model family")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (same seed -> identical weights)")
    ap.add_argument("--prediction", choices=["epsilon", "v_prediction"], default=None,
                    help="prediction type (default: sd15/sdxl epsilon, sd2 v_prediction; sd3 is flow)")
    ap.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    args = ap.parse_args(argv)

    import torch

    from library.models.save import save_diffusers
    from library.models.tiny import build_tiny

    model = build_tiny(FAMILIES[args.family], seed=args.seed, prediction_type=args.prediction)
    out = save_diffusers(model, args.out, dtype=torch.float32)
    print(f"wrote tiny {args.family} model ({model.prediction_type}, seed {args.seed}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
