#!/usr/bin/env python
"""Train a LoRA / LoCon / LoHa / LoKr / DoRA adapter for an SD1.x / SD2.x / SDXL model.

    python train_lora.py --config configs/quickstart.toml
    python train_lora.py --config my.toml --network.network_dim=16 --learning_rate 1e-4
    python train_lora.py --config my.toml --print-config

Writes a kohya-format `.safetensors` (what A1111, ComfyUI, Forge and diffusers' `load_lora_weights` read), with
`ss_*` / `modelspec.*` metadata, the resolved config beside it, samples, logs and resume states.
"""

from __future__ import annotations

import sys

from library.cli import main_guard
from library.methods.lora import CONFIG_CLASS, make_method
from library.training.run import run_script


@main_guard
def main(argv: list[str] | None = None) -> int:
    return run_script(CONFIG_CLASS, make_method, argv, prog="train_lora.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
