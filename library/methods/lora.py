"""LoRA / LoCon / LoHa / LoKr / DoRA adapters: only the adapters train; the base model stays bit-identical."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from library.config.fields import opt
from library.config.network import NetworkConfig
from library.config.optim import OptimizerConfig
from library.config.run import RunConfig
from library.methods.base import Method, SaveContext
from library.models.model import SDModel
from library.precision import DTYPES


@dataclass
class LoraRunConfig(RunConfig):
    network: NetworkConfig = opt(NetworkConfig(), "The adapter: type, rank/alpha, targets, per-block settings.")


CONFIG_CLASS = LoraRunConfig


class LoraTraining(Method):
    """Only the adapters train; the base model stays bit-identical."""

    name = "lora"

    def __init__(self, network: NetworkConfig, optimizer: OptimizerConfig, save_precision: str = "fp16"):
        self.network_cfg, self.optimizer, self.save_precision = network, optimizer, save_precision
        self.network = None

    def setup(self, model: SDModel) -> list[dict]:
        from library.networks.lora import inject_network, param_groups

        for module in [model.unet, model.vae, *model.text_encoders]:
            module.requires_grad_(False)
        self.network = inject_network(model, self.network_cfg)
        if self.network_cfg.network_weights:  # continue a file: strict, same modules and ranks
            if model.family == "sd3":
                from library.networks.sd3_keys import load_sd3_file_into as load_file
            else:
                from library.networks.kohya import load_kohya_file_into as load_file
            load_file(model, self.network, self.network_cfg.network_weights)
        for p in self.network.parameters():
            p.requires_grad_(True)
        o = self.optimizer
        return param_groups(self.network, o.learning_rate, o.unet_lr, o.text_encoder_lr)

    def _trains_te(self) -> bool:
        return any(m.component != "unet" for m in self.network.modules)

    def modules_to_prepare(self, model: SDModel) -> list[torch.nn.Module]:
        return [model.unet, *(model.text_encoders if self._trains_te() else [])]

    def trains_text_encoder(self, step: int) -> bool:
        if self.network is None:  # asked before setup (the run plan's check): what the table says will be adapted
            return not self.network_cfg.train_unet_only
        return self._trains_te()

    def after_optimizer_step(self, model: SDModel, step: int) -> dict[str, float]:
        from library.networks.lora import apply_max_norm

        if self.network_cfg.scale_weight_norms <= 0:
            return {}
        scaled, mean_norm, max_norm = apply_max_norm(self.network, self.network_cfg.scale_weight_norms)
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

    def save_result(self, model: SDModel, stem: Path, ctx: SaveContext) -> Path:
        from library.networks.kohya import metadata_for, network_state_dict_kohya, save_kohya

        net, o, run = self.network_cfg, self.optimizer, ctx.run
        md = metadata_for(
            # SD3's family-specific ss_* / modelspec fields are metadata_sd3's (below); the rest is shared
            family="sdxl" if model.family == "sd3" else model.family,
            v_prediction=model.prediction_type == "v_prediction", network_module=net.module,
            network_dim=net.network_dim, network_alpha=net.network_alpha, title=run.output_name,
            network_args={"conv_dim": net.conv_dim, "conv_alpha": net.conv_alpha} if net.conv_dim else None,
            base_model=run.base_model, resolution=run.resolution, steps=ctx.step, epochs=ctx.epoch,
            num_train_images=ctx.data.num_train_images, learning_rate=o.learning_rate, unet_lr=o.unet_lr,
            text_encoder_lr=o.text_encoder_lr, training_started_at=run.started_at, training_finished_at=time.time(),
            seed=run.seed, clip_skip=run.clip_skip, tag_frequency=ctx.data.tag_frequency,
            datasets=ctx.data.datasets, config_text=run.config_text, config_hash=run.config_hash,
            extra={k: v for k, v in ctx.metadata().items() if k != "sdtk_config"})
        if model.family == "sd3":  # diffusers / peft layout (default) or sd-scripts' (network.sd3_layout)
            from library.networks import sd3_keys

            layout = net.sd3_layout
            state = sd3_keys.state_dict_sd3(model, self.network, layout, DTYPES[self.save_precision])
            md = {**{k: v for k, v in md.items() if not k.startswith(("ss_v2", "ss_v_param", "modelspec.impl"))},
                  **sd3_keys.metadata_sd3(model, self.network, layout), "modelspec.prediction_type": "flow",
                  "modelspec.implementation": "diffusers"}
            return sd3_keys.save_sd3_lora(stem.with_suffix(".safetensors"), state, md)
        state = network_state_dict_kohya(model, self.network, dtype=DTYPES[self.save_precision])
        return save_kohya(stem.with_suffix(".safetensors"), state, md)

    def estimate_kind(self) -> tuple[str, dict]:
        return "lora", {"network": self.network_cfg}


def make_method(cfg: LoraRunConfig) -> LoraTraining:
    return LoraTraining(cfg.network, cfg.optimizer, cfg.save.save_precision)
