"""The run plan: every derived fact of a training run, resolved once, before any weight is read.

After the config is loaded and the model family is known (from its configs or file header: library/models/peek.py),
`make_plan` resolves what every part of the run then receives ready-made: the data config to train on (DreamBooth
writes its own), each dataset's resolution and batch size (an sd-scripts dataset file's [general] values included),
the native resolution (SD2-base 512 vs 768-v), the prediction type and its compatibility with the noise and loss
settings, the sample prompts, the text-output caching rule and the facts written into results. Every cross-field
check lives here, so a config mistake stops the run before the model loads, and `--dry-run` runs the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from library.config.core import config_hash, dump_toml
from library.config.diffusion import check_prediction_compat
from library.errors import ConfigError
from library.methods.base import Method, RunFacts
from library.models.peek import ModelPeek, peek_model


@dataclass(frozen=True)
class RunPlan:
    peek: ModelPeek  # family, config folder, prediction type (None until the weights tell: SD2 single files)
    data: Any  # the [data] table to train on (DreamBooth: pointing at the dataset file it wrote)
    native_resolution: int  # side the model was trained at: data.resolution = 0, the resolution shift
    resolutions: tuple[tuple[int, int], ...]  # (width, height) of each dataset
    batch_size: int  # the first dataset's (DeepSpeed's micro-batch size)
    prompts: tuple  # parsed sample prompts (library.training.sample.SamplePrompt)
    cache_text: bool  # encode every caption once, then move the text encoders off the GPU
    facts: RunFacts

    @property
    def family(self) -> str:
        return self.peek.family

    @property
    def resolution(self) -> tuple[int, int]:
        """(width, height) results are described with (ss_resolution, modelspec) and samples default to."""
        return self.resolutions[0]

    def confirm(self, model, cfg) -> "RunPlan":
        """After loading: the prediction type the weights showed, checked where the headers could not tell."""
        if model.prediction_type == self.facts.prediction_type:
            return self
        check_prediction_compat(cfg.noise, model.prediction_type, cfg.loss)
        return replace(self, facts=replace(self.facts, prediction_type=model.prediction_type))


def make_plan(cfg: Any, method: Method, *, script: str, dry_run: bool = False, peek: ModelPeek | None = None
              ) -> RunPlan:
    """`peek`: the model's facts when they had to come from the loaded model (library.models.peek.needs_weights)."""
    from library.data.dataset import dataset_specs

    peek = peek or peek_model(cfg.model)
    if peek.family not in method.families:
        from library.models.families import FAMILIES

        raise ConfigError(f"{script}: {method.name.replace('_', ' ')} does not apply to {FAMILIES[peek.family].label} "
                          f"({cfg.model.pretrained_model_name_or_path}); it trains "
                          f"{', '.join(FAMILIES[f].label for f in method.families)} models")
    if peek.prediction_type is not None and cfg.model.resolved_prediction_type() is None:
        # the model's own prediction type (a forced one was checked when the config loaded: RunConfig.validate)
        check_prediction_compat(cfg.noise, peek.prediction_type, cfg.loss)
    native = peek.native_resolution
    data = method.prepare_data(cfg.data, dry_run=dry_run)
    if data.bucket_reso_steps == 32 and peek.family != "sdxl":
        raise ConfigError("data.bucket_reso_steps = 32 is for SDXL only; SD1/SD2 need a multiple of 64")
    specs = dataset_specs(data, native)
    _check_device_options(cfg.train)
    cache_text = data.cache_text_encoder_outputs
    if cache_text and method.trains_text_encoder(0):
        raise ConfigError("data.cache_text_encoder_outputs = true, but this run trains the text encoder(s): "
                          "turn the caching off, or stop training the text encoder(s)")
    resolutions = tuple(tuple(s.resolution) for s in specs)
    prompts = tuple(_sample_prompts(cfg.sample, resolutions[0]))
    facts = RunFacts(script=script, family=peek.family, prediction_type=peek.prediction_type or "v_prediction",
                     base_model=cfg.model.pretrained_model_name_or_path, resolution=resolutions[0],
                     seed=cfg.train.seed, clip_skip=cfg.model.clip_skip, output_name=cfg.save.output_name,
                     config_text=dump_toml(replace(cfg, data=data), comments=False),
                     config_hash=config_hash(replace(cfg, data=data)))
    return RunPlan(peek, data, native, resolutions, specs[0].batch_size, prompts, cache_text, facts)


def _check_device_options(train) -> None:
    """Options that need hardware this process has: checked before loading (the loop would fail after)."""
    import torch

    cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    if train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if train.attention == "xformers":
        if not cuda:
            raise ConfigError("train.attention = 'xformers' needs a CUDA GPU; use 'sdpa' (the default)")
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("train.attention = 'xformers' but xformers is not installed: pip install xformers "
                              "(or use 'sdpa')")


def _sample_prompts(sample, resolution: tuple[int, int]) -> list:
    from library.training.sample import SamplePrompt, read_prompts

    width, height = resolution
    defaults = SamplePrompt(prompt="", width=sample.width or width, height=sample.height or height,
                            seed=sample.seed, steps=sample.steps, cfg_scale=sample.cfg_scale)
    return read_prompts(sample.prompts, sample.prompts_file, defaults)
