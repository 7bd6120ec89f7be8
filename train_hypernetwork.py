#!/usr/bin/env python
"""Train an AUTOMATIC1111-style hypernetwork (SD1.x, SD2.x and SDXL); the base model stays untouched.
Does not apply to SD3 / SD3.5 (the format hooks UNet cross-attention, which MMDiT has not): refused before loading.

    python train_hypernetwork.py --config configs/quickstart_hypernetwork.toml
    python train_hypernetwork.py --config my.toml --learning_rate 5e-6 --max_train_steps 4000
    python train_hypernetwork.py --config my.toml --hypernetwork.network_weights old.pt   # continue a file

Writes `<output_name>.pt` in A1111's layout (SD1/SD2: put it in A1111's models/hypernetworks, or ComfyUI's
models/hypernetworks; `torch.load(weights_only=True)` reads it), the resolved config, samples (with the hypernetwork
at hypernetwork.sample_strength), logs and resume states. SDXL files use the same layout with widths 640, 1280 and
2048; A1111 does not load SDXL hypernetworks, so sample with diffusers:

    from library.networks.hypernetwork import apply_hypernetwork
    from library.networks.hypernetwork_file import load_hypernetwork
    hn, info = load_hypernetwork("my_sdxl.pt")
    apply_hypernetwork(pipe.unet, hn.to(pipe.device), strength=0.8)   # pipe: any diffusers SD/SDXL pipeline
"""

from __future__ import annotations

import sys

from library.cli import main_guard
from library.methods.hypernetwork import CONFIG_CLASS, make_method
from library.training.run import run_script


@main_guard
def main(argv: list[str] | None = None) -> int:
    return run_script(CONFIG_CLASS, make_method, argv, prog="train_hypernetwork.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
