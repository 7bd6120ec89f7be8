#!/usr/bin/env python
"""Full fine-tune of the UNet (optionally the text encoder(s)) of an SD1.x / SD2.x / SDXL model, or of the MMDiT
transformer of an SD3 / SD3.5 model.

    python train_native.py --config configs/quickstart_native.toml
    python train_native.py --config my.toml --learning_rate 1e-6 --max_train_steps 2000
    python train_native.py --config my.toml --print-config

Writes a checkpoint users load in A1111 / ComfyUI / Forge (single-file `.safetensors`, the default) or diffusers
(`save.format = "diffusers"`), the resolved config beside it, samples, logs and resume states.
"""

from __future__ import annotations

import sys

from library.cli import main_guard
from library.methods.native import CONFIG_CLASS, make_method
from library.training.run import run_script


@main_guard
def main(argv: list[str] | None = None) -> int:
    return run_script(CONFIG_CLASS, make_method, argv, prog="train_native.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
