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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from library.cli import main_guard
from library.config.fields import opt
from library.config.network import NetworkConfig
from library.config.run import RunConfig
from library.models.model import SDModel
from library.training.method import Method
from library.training.run import run_script

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoraRunConfig(RunConfig):
    network: NetworkConfig = opt(NetworkConfig(), "The adapter: type, rank/alpha, targets, per-block settings.")


CONFIG_CLASS = LoraRunConfig


class LoraTraining(Method):
    """Only the adapters train; the base model stays bit-identical."""

    name = "lora"

    def __init__(self, cfg: LoraRunConfig):
        self.cfg = cfg
        self.network = None
        self.data_info: dict = {}
        self.started = time.time()

    def setup(self, model: SDModel) -> list[dict]:
        from library.networks.lora import inject_network, param_groups

        for module in [model.unet, model.vae, *model.text_encoders]:
            module.requires_grad_(False)
        self.network = inject_network(model, self.cfg.network)
        for p in self.network.parameters():
            p.requires_grad_(True)
        o = self.cfg.optimizer
        return param_groups(self.network, o.learning_rate, o.unet_lr, o.text_encoder_lr)

    def bind_data(self, info: dict) -> None:
        self.data_info = info

    def _trains_te(self) -> bool:
        return any(m.component != "unet" for m in self.network.modules)

    def modules_to_prepare(self, model: SDModel) -> list[torch.nn.Module]:
        return [model.unet, *(model.text_encoders if self._trains_te() else [])]

    def trains_text_encoder(self, step: int) -> bool:
        return self._trains_te()

    def after_optimizer_step(self, model: SDModel, step: int) -> dict[str, float]:
        from library.networks.lora import apply_max_norm

        if self.cfg.network.scale_weight_norms <= 0:
            return {}
        scaled, mean_norm, max_norm = apply_max_norm(self.network, self.cfg.network.scale_weight_norms)
        return {"max_norm/keys_scaled": scaled, "max_norm/average": mean_norm, "max_norm/max": max_norm}

    def trainable_state(self, model: SDModel) -> dict[str, torch.Tensor]:
        from library.networks.lora import adapter_params

        return {f"{m.component}.{m.path}.{attr}": p for m in self.network.modules
                for attr, p in adapter_params(m.layer, self.network.adapter_name).items()}

    def load_trainable_state(self, model: SDModel, state: dict[str, torch.Tensor]) -> None:
        current = self.trainable_state(model)
        if set(current) != set(state):
            raise ValueError("the resume state was written for a different network (keys differ)")
        with torch.no_grad():
            for k, p in current.items():
                p.copy_(state[k])

    def save_result(self, model: SDModel, stem: Path, metadata: dict[str, str]) -> Path:
        from library.networks.kohya import metadata_for, network_state_dict_kohya, save_kohya

        net, c = self.cfg.network, self.cfg
        side = self.data_info.get("resolution", 512)
        md = metadata_for(
            family=model.family, v_prediction=model.prediction_type == "v_prediction", network_module=net.module,
            network_dim=net.network_dim, network_alpha=net.network_alpha, title=c.save.output_name,
            network_args={"conv_dim": net.conv_dim, "conv_alpha": net.conv_alpha} if net.conv_dim else None,
            base_model=c.model.pretrained_model_name_or_path, resolution=(side, side),
            steps=int(metadata.get("sdtk_step", 0)), epochs=int(metadata.get("sdtk_epoch", 0)),
            num_train_images=self.data_info.get("num_train_images", 0), learning_rate=c.optimizer.learning_rate,
            unet_lr=c.optimizer.unet_lr, text_encoder_lr=c.optimizer.text_encoder_lr,
            training_started_at=self.started, training_finished_at=time.time(), seed=c.train.seed,
            clip_skip=c.model.clip_skip, tag_frequency=self.data_info.get("tag_frequency"),
            datasets=self.data_info.get("datasets"), config_text=metadata.get("sdtk_config", ""),
            extra={k: v for k, v in metadata.items() if k != "sdtk_config"})
        state = network_state_dict_kohya(model, self.network, dtype=DTYPES[c.save.save_precision])
        return save_kohya(stem.with_suffix(".safetensors"), state, md)


@main_guard
def main(argv: list[str] | None = None) -> int:
    return run_script(CONFIG_CLASS, LoraTraining, argv, prog="train_lora.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
