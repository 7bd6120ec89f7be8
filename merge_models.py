#!/usr/bin/env python
"""Merge SD1.x / SD2.x / SDXL / SD3 / SD3.5 checkpoints from a TOML recipe, streaming tensor by tensor.

    python merge_models.py --config configs/quickstart_merge.toml
    python merge_models.py --merge.model_a a.safetensors --merge.model_b b.safetensors --merge.alpha 0.3 \\
        --output.path merged.safetensors
    python merge_models.py --config my_merge.toml --merge.block_alphas GRAD_V --print-config

Modes: weighted sum, add difference, triple sum, sum twice (each with per-block alphas: SD1/SD2 26 slots, SDXL 20,
SD3 N joint blocks + 7: BASE, five embedders, joint_blocks.0..N-1, final_layer), TIES / DARE task-vector merges,
LoRAs merged into a checkpoint, LoRA extraction by SVD and LoRA rank resizing (SD3 LoRAs: the diffusers/peft layout
train_lora.py writes, or sd-scripts'; extracted ones are written in the diffusers/peft layout).
Inputs: single-file .safetensors (.ckpt through the weights-only loader; SD3 files with or without their text
encoders, both inputs alike), diffusers folders or tiny: references, of one family. Output: a single .safetensors
file or a diffusers folder (fp16 / bf16 / fp32), the recipe in its metadata.
"""

from __future__ import annotations

import json
import sys

from library.cli import main_guard
from library.config.core import dump_toml, parse_cli
from library.config.merge import MergeRecipe

CONFIG_CLASS = MergeRecipe

# Names users know from sd-scripts' merge / extract scripts and the A1111 merger.
ALIASES = {
    "model_a": "merge.model_a",
    "model_b": "merge.model_b",
    "model_c": "merge.model_c",
    "mode": "merge.mode",
    "alpha": "merge.alpha",
    "beta": "merge.beta",
    "save_to": "output.path",
    "output_dir": "output.path",  # the training scripts' name for where results go
    "save_precision": "output.precision",
    "dim": "extract.rank",
    "conv_dim": "extract.conv_rank",
    "clamp_quantile": "extract.clamp_quantile",
    "new_rank": "extract.rank",
}
EXTRA_FLAGS = {"no_progress": "do not show the progress bar",
               "timings": "print where a merge's time went (read, merge, write, fsync seconds) as JSON on stderr",
               "no_prefetch": "do not read the inputs' first GBs into the page cache while starting up"}


@main_guard
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, flags = parse_cli(CONFIG_CLASS, argv, aliases=ALIASES, prog="merge_models.py", description=__doc__,
                           extra_flags=EXTRA_FLAGS)
    recipe = dump_toml(cfg)
    if flags.print_config:
        print(recipe, end="")
        return 0
    if not flags.dry_run and not flags.extra["no_prefetch"]:
        from library.merge.prefetch import input_refs, start_prefetch

        start_prefetch(input_refs(cfg))  # the disk reads while torch is imported
    from library.merge.run import run_recipe

    timings: dict[str, float] = {}
    out = run_recipe(cfg, recipe, progress=not flags.extra["no_progress"], dry_run=flags.dry_run, timings=timings)
    if out is not None:
        print(f"wrote {out}")
    if flags.extra["timings"] and timings:
        print("timings " + json.dumps({k: round(v, 3) for k, v in timings.items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
