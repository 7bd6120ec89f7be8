#!/usr/bin/env python
"""Full fine-tune of the UNet (optionally the text encoder(s)) of an SD1.x / SD2.x / SDXL model.

    python train_native.py --config configs/quickstart_native.toml
    python train_native.py --config my.toml --learning_rate 1e-6 --max_train_steps 2000
    python train_native.py --config my.toml --print-config

Writes a checkpoint users load in A1111 / ComfyUI / Forge (single-file `.safetensors`, the default) or diffusers
(`save.format = "diffusers"`), the resolved config beside it, samples, logs and resume states.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from library.cli import main_guard
from library.models.model import SDModel
from library.training.method import Method
from library.training.run import run_script
from library.config.run import RunConfig

CONFIG_CLASS = RunConfig
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NativeFineTune(Method):
    """Every UNet weight trains; the text encoder(s) too when train.train_text_encoder is set."""

    name = "native"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.te_active = cfg.train.train_text_encoder

    def setup(self, model: SDModel) -> list[dict]:
        opt = self.cfg.optimizer
        lr = opt.learning_rate
        model.vae.requires_grad_(False)
        model.unet.requires_grad_(True)
        groups = [{"params": list(model.unet.parameters()), "lr": opt.unet_lr or lr, "name": "unet"}]
        for i, enc in enumerate(model.text_encoders):
            enc.requires_grad_(self.te_active)
            if self.te_active:
                te_lr = opt.text_encoder_lr if opt.text_encoder_lr is not None else lr
                groups.append({"params": list(enc.parameters()), "lr": te_lr, "name": f"text_encoder{i + 1}"})
        return groups

    def modules_to_prepare(self, model: SDModel) -> list[torch.nn.Module]:
        return [model.unet, *(model.text_encoders if self.te_active else [])]

    def trains_text_encoder(self, step: int) -> bool:
        return self.te_active

    def before_step(self, model: SDModel, step: int) -> None:
        stop = self.cfg.train.stop_text_encoder_training
        if self.te_active and stop > 0 and step >= stop:
            self.te_active = False  # from here on text outputs are frozen (and cached by the loop)
            for enc in model.text_encoders:
                enc.requires_grad_(False)
                enc.eval()

    def trainable_state(self, model: SDModel) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
        if self.cfg.train.train_text_encoder:
            for i, enc in enumerate(model.text_encoders):
                state.update({f"te{i}.{k}": v for k, v in enc.state_dict().items()})
        return state

    def load_trainable_state(self, model: SDModel, state: dict[str, torch.Tensor]) -> None:
        modules = {"unet": model.unet, **{f"te{i}": e for i, e in enumerate(model.text_encoders)}}
        for prefix, module in modules.items():
            part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if part:
                module.load_state_dict(part, strict=True)

    def save_result(self, model: SDModel, stem: Path, metadata: dict[str, str]) -> Path:
        from library.models.save import save_diffusers
        from library.models.single_file import save_single_file

        dtype = DTYPES[self.cfg.save.save_precision]
        if self.cfg.save.format == "diffusers":
            save_diffusers(model, stem, dtype=dtype)
            return stem
        path = stem.with_suffix(".safetensors")
        save_single_file(model, path, dtype=dtype, metadata=metadata)
        return path


@main_guard
def main(argv: list[str] | None = None) -> int:
    return run_script(CONFIG_CLASS, NativeFineTune, argv, prog="train_native.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
