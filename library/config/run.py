"""The root config every training script shares, and the sd-scripts flag names mapped onto it.

A script's root config is `RunConfig` (or a subclass adding the method's own table, e.g. `[network]`).
Precedence: command line > config file > defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from library.config.data import DataConfig
from library.config.diffusion import LossConfig, NoiseConfig, check_prediction_compat
from library.config.estimate import EstimateConfig
from library.config.fields import opt
from library.config.model import ModelConfig
from library.config.optim import OptimizerConfig, SchedulerConfig
from library.config.train import LogConfig, SampleConfig, SaveConfig, TrainConfig

# sd-scripts' most-typed flags -> our table.key (so `--learning_rate 1e-4` works as users type it).
SD_SCRIPTS_ALIASES: dict[str, str] = {
    "pretrained_model_name_or_path": "model.pretrained_model_name_or_path",
    "v_parameterization": "model.v_parameterization",
    "clip_skip": "model.clip_skip",
    "vae": "model.vae",
    "output_dir": "save.output_dir",
    "output_name": "save.output_name",
    "save_every_n_steps": "save.save_every_n_steps",
    "save_every_n_epochs": "save.save_every_n_epochs",
    "save_precision": "save.save_precision",
    "max_train_steps": "train.max_train_steps",
    "max_train_epochs": "train.max_train_epochs",
    "seed": "train.seed",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "mixed_precision": "train.mixed_precision",
    "learning_rate": "optimizer.learning_rate",
    "unet_lr": "optimizer.unet_lr",
    "text_encoder_lr": "optimizer.text_encoder_lr",
    "optimizer_type": "optimizer.optimizer_type",
    "max_grad_norm": "optimizer.max_grad_norm",
    "lr_scheduler": "scheduler.scheduler_type",
    "lr_warmup_steps": "scheduler.warmup_steps",
    "train_batch_size": "data.batch_size",
    "resolution": "data.resolution",
    "dataset_config": "data.dataset_config",
    "train_data_dir": "data.train_data_dir",
    "reg_data_dir": "data.reg_data_dir",
    "cache_latents": "data.cache_latents",
    "cache_latents_to_disk": "data.cache_latents_to_disk",
    "cache_text_encoder_outputs": "data.cache_text_encoder_outputs",
    "cache_text_encoder_outputs_to_disk": "data.cache_text_encoder_outputs_to_disk",
    "validation_split": "data.validation_split",
    "validation_seed": "data.validation_seed",
    "validate_every_n_steps": "train.validate_every_n_steps",
    "validate_every_n_epochs": "train.validate_every_n_epochs",
    "max_validation_steps": "train.max_validation_steps",
    # diffusers' text-to-image example names for a Hugging Face dataset (train_data_dir keeps sd-scripts' meaning)
    "dataset_name": "data.dataset_name",
    "image_column": "data.image_column",
    "caption_column": "data.caption_column",
    "noise_offset": "noise.offset",
    "min_snr_gamma": "loss.min_snr_gamma",
    "zero_terminal_snr": "noise.zero_terminal_snr",
    "sample_every_n_steps": "sample.sample_every_n_steps",
    "sample_prompts": "sample.prompts_file",
    "logging_dir": "log.logging_dir",
}


# Every table module's sd-scripts names (KOHYA_NAMES), merged with the flags above by `sd_scripts_names`.
_TABLE_NAMES = ("library.config.diffusion", "library.config.network", "library.config.embedding")


def sd_scripts_names(root_cls: type, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The sd-scripts names a script with root config `root_cls` accepts: SD_SCRIPTS_ALIASES, every table's
    KOHYA_NAMES whose table the root has (`--network_dim` only where there is a `[network]`), then `extra`."""
    import dataclasses
    import importlib

    tables = {f.name for f in dataclasses.fields(root_cls)}
    names = dict(SD_SCRIPTS_ALIASES)
    for module in _TABLE_NAMES:
        for name, target in importlib.import_module(module).KOHYA_NAMES.items():
            if target.partition(".")[0] in tables:
                names.setdefault(name, target)
    names.update(extra or {})
    return names


@dataclass
class RunConfig:
    model: ModelConfig = opt(ModelConfig(), "Base model.")
    data: DataConfig = opt(DataConfig(), "Dataset, bucketing, captions, caching.")
    train: TrainConfig = opt(TrainConfig(), "Steps, precision, memory savers, EMA, resume.")
    optimizer: OptimizerConfig = opt(OptimizerConfig(), "Optimizer and learning rates.")
    scheduler: SchedulerConfig = opt(SchedulerConfig(), "Learning-rate schedule.")
    noise: NoiseConfig = opt(NoiseConfig(), "Noise schedule, timesteps and noise techniques.")
    loss: LossConfig = opt(LossConfig(), "Loss function and weighting.")
    save: SaveConfig = opt(SaveConfig(), "Where and how often results are saved.")
    sample: SampleConfig = opt(SampleConfig(), "Sample images during training.")
    log: LogConfig = opt(LogConfig(), "Progress and TensorBoard logging.")
    estimate: EstimateConfig = opt(EstimateConfig(), "What --dry-run compares against: GPUs, utilisation, price.")

    def validate(self) -> None:
        forced = self.model.resolved_prediction_type()
        if forced is not None:
            check_prediction_compat(self.noise, forced, self.loss)
