#!/usr/bin/env python
"""Train a LoRA / LoCon / LoHa / LoKr / DoRA adapter for an SD1.x / SD2.x / SDXL model, or a LoRA for SD3 / SD3.5.

    python train_lora.py --config configs/quickstart.toml
    python train_lora.py --config configs/quickstart_sd3_lora.toml        # the embedded tiny SD3.5-layout model
    python train_lora.py --config my.toml --network.network_dim=16 --learning_rate 1e-4
    python train_lora.py --config my.toml --print-config

Writes a kohya-format `.safetensors` (what A1111, ComfyUI, Forge and diffusers' `load_lora_weights` read), with
`ss_*` / `modelspec.*` metadata, the resolved config beside it, samples, logs and resume states. SD3 LoRAs are
written in the diffusers / peft layout (diffusers' StableDiffusion3Pipeline.load_lora_weights, ComfyUI), or with
network.sd3_layout = "sd_scripts" in sd-scripts' (lora_unet_joint_blocks_N_..., fused qkv).
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
