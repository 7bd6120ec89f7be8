#!/usr/bin/env python
"""Textual inversion: train a new token's embedding vectors (SD1.x / SD2.x / SDXL), everything else frozen.
Does not apply to SD3 / SD3.5 (no embedding format is defined for its three text encoders): refused before loading.

    python train_textual_inversion.py --config configs/quickstart_textual_inversion.toml
    python train_textual_inversion.py --config my.toml --token_string "<my-cat>" --init_word cat
    python train_textual_inversion.py --config my.toml --print-config

Writes an embedding users load in A1111 / ComfyUI / Forge / diffusers (`.safetensors` with the single key
`emb_params`, SDXL `clip_l` + `clip_g`; or A1111's `.pt` with `embedding.format = "pt"`), the resolved config beside
it, samples (prompts may use the token, in `--n` too), logs and resume states.
"""

from __future__ import annotations

import sys

from library.cli import main_guard
from library.methods.textual_inversion import CONFIG_CLASS, make_method
from library.training.run import run_script


@main_guard
def main(argv: list[str] | None = None) -> int:
    return run_script(CONFIG_CLASS, make_method, argv, prog="train_textual_inversion.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
