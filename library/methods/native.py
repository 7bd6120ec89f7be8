"""Full fine-tune: every UNet weight trains, the text encoder(s) too when train.train_text_encoder is set."""

from __future__ import annotations

from pathlib import Path

import torch

from library.config.optim import OptimizerConfig
from library.config.run import RunConfig
from library.config.train import SaveConfig
from library.methods.base import Method, SaveContext
from library.models.model import SDModel
from library.precision import DTYPES

CONFIG_CLASS = RunConfig


class NativeFineTune(Method):
    """Every UNet weight trains; the text encoder(s) too when `train_text_encoder`, until `stop_text_encoder_at`."""

    name = "native"

    def __init__(self, optimizer: OptimizerConfig, save: SaveConfig, *, train_text_encoder: bool = False,
                 stop_text_encoder_at: int = 0):
        self.optimizer, self.save = optimizer, save
        self.train_te, self.stop_te_at = train_text_encoder, stop_text_encoder_at
        self.te_active = train_text_encoder

    def setup(self, model: SDModel) -> list[dict]:
        opt = self.optimizer
        model.vae.requires_grad_(False)
        model.unet.requires_grad_(True)
        groups = [{"params": list(model.unet.parameters()), "lr": opt.unet_lr or opt.learning_rate, "name": "unet"}]
        for i, enc in enumerate(model.text_encoders):
            enc.requires_grad_(self.te_active)
            if self.te_active:
                te_lr = opt.text_encoder_lr if opt.text_encoder_lr is not None else opt.learning_rate
                groups.append({"params": list(enc.parameters()), "lr": te_lr, "name": f"text_encoder{i + 1}"})
        return groups

    def modules_to_prepare(self, model: SDModel) -> list[torch.nn.Module]:
        return [model.unet, *(model.text_encoders if self.te_active else [])]

    def trains_text_encoder(self, step: int) -> bool:
        return self.te_active

    def before_step(self, model: SDModel, step: int) -> None:
        if self.te_active and self.stop_te_at > 0 and step >= self.stop_te_at:
            self.te_active = False  # from here on text outputs are frozen (and cached by the loop)
            for enc in model.text_encoders:
                enc.requires_grad_(False)
                enc.eval()

    def trainable_state(self, model: SDModel) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
        if self.train_te:
            for i, enc in enumerate(model.text_encoders):
                state.update({f"te{i}.{k}": v for k, v in enc.state_dict().items()})
        return state

    def load_trainable_state(self, model: SDModel, state: dict[str, torch.Tensor]) -> None:
        modules = {"unet": model.unet, **{f"te{i}": e for i, e in enumerate(model.text_encoders)}}
        for prefix, module in modules.items():
            part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if part:
                module.load_state_dict(part, strict=True)

    def save_result(self, model: SDModel, stem: Path, ctx: SaveContext) -> Path:
        from library.models.save import save_diffusers
        from library.models.single_file import save_single_file

        dtype = DTYPES[self.save.save_precision]
        if self.save.format == "diffusers":
            save_diffusers(model, stem, dtype=dtype)
            return stem
        path = stem.with_suffix(".safetensors")
        save_single_file(model, path, dtype=dtype, metadata=ctx.metadata())
        return path

    def estimate_kind(self) -> tuple[str, dict]:
        return "full", {}


def make_method(cfg: RunConfig) -> NativeFineTune:
    return NativeFineTune(cfg.optimizer, cfg.save, train_text_encoder=cfg.train.train_text_encoder,
                          stop_text_encoder_at=cfg.train.stop_text_encoder_training)
