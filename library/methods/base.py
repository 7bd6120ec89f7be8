"""The hooks through which a training method (full fine-tune, LoRA, textual inversion, ...) plugs into the one loop,
and the typed facts a method is told about its run.

The loop (library/training/loop.py) owns everything that is the same for every method: data, noise, loss,
precision, accumulation, optimizer and scheduler steps, EMA, NaN guard, saving, resuming, sampling, logging.
A method says only what is different: which parameters train, how the loss of a batch is made (default: the loop's),
what "the result" is and how it is written. A method is built from its own config sections (`make_method(cfg)` in
its module picks them); what it needs to know about the run comes as `RunFacts` / `SaveContext`, never the whole
run config.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from library.models.model import SDModel



@dataclass(frozen=True)
class RunFacts:
    """Facts about the run, resolved once by library/training/plan.py and the loaded model."""

    script: str
    family: str
    prediction_type: str
    base_model: str  # what the user named (model.pretrained_model_name_or_path)
    resolution: tuple[int, int]  # (width, height) the first dataset trains at
    seed: int
    clip_skip: int
    output_name: str
    config_text: str = ""  # the resolved TOML without comments
    config_hash: str = ""  # library.config.core.config_hash of the resolved config
    started_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class DataFacts:
    """What the built data is: for metadata such as kohya's ss_tag_frequency / ss_datasets."""

    num_train_images: int = 0
    tag_frequency: dict = field(default_factory=dict)
    datasets: list = field(default_factory=list)


@dataclass(frozen=True)
class SaveContext:
    """Where the run is when a result is saved."""

    step: int
    epoch: int
    run: RunFacts
    data: DataFacts

    def metadata(self) -> dict[str, str]:
        """The `sdtk_*` strings written into every result (safetensors metadata is str -> str)."""
        r = self.run
        return {"sdtk_script": r.script, "sdtk_config_hash": r.config_hash, "sdtk_config": r.config_text,
                "sdtk_base_model": r.base_model, "sdtk_family": r.family, "sdtk_prediction_type": r.prediction_type,
                "sdtk_step": str(self.step), "sdtk_epoch": str(self.epoch)}


class Method(abc.ABC):
    """Base class: four abstract hooks every method fills, and defaults for the optional ones."""

    name = "base"
    # Model families the method applies to; the run plan refuses others before loading (e.g. no TI for SD3).
    families: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sd3")

    @abc.abstractmethod
    def setup(self, model: SDModel) -> list[dict[str, Any]]:
        """Freeze / inject / unfreeze; return optimizer param groups: dicts with "params", "lr" and "name"."""

    def prepare_data(self, data_cfg: Any, *, dry_run: bool = False) -> Any:
        """The `[data]` table to train on, before anything is indexed (DreamBooth writes its dataset file here)."""
        return data_cfg

    def fixed_captions(self) -> list[str]:
        """Captions of data the method owns, to encode once with the loop's (data.cache_text_encoder_outputs)."""
        return []

    def bind(self, run: RunFacts, data: DataFacts, build_data: Callable | None = None) -> None:
        """Told once, before `setup`, what the run and its data are. `build_data(data_cfg, seed)` builds more data
        the way the loop's data was built (DreamBooth's class images)."""
        self.run, self.data = run, data

    def modules_to_prepare(self, model: SDModel) -> list[torch.nn.Module]:
        """Modules that hold trained parameters (wrapped by accelerate for DDP, put in train mode)."""
        return [model.unet]

    def trains_text_encoder(self, step: int) -> bool:
        """Whether text-encoder gradients are needed at this step (else text outputs may be cached)."""
        return False

    def prepare_captions(self, captions: list[str], batch_number: int) -> list[str]:
        """Rewrite a batch's captions (e.g. put a placeholder token in, or use prompt templates).

        `batch_number` counts batches across steps, accumulation and ranks; seed any randomness from it so resumed
        runs see the same captions.
        """
        return captions

    def batch_loss(self, batch: dict, batch_number: int, loss_of: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        """The loss of one batch. `loss_of(batch)` is the loop's (noise, denoiser, objective); a method may change
        the batch first (DreamBooth appends a class batch) or combine several."""
        return loss_of(batch)

    def before_step(self, model: SDModel, step: int) -> None:
        """Called before each optimizer step's batches (e.g. stop text-encoder training at a step)."""

    def after_optimizer_step(self, model: SDModel, step: int) -> dict[str, float]:
        """Called after each optimizer step (e.g. max-norm regularisation, restoring frozen embedding rows).

        Returns scalars to log.
        """
        return {}

    @abc.abstractmethod
    def trainable_state(self, model: SDModel) -> dict[str, torch.Tensor]:
        """The trained tensors, exactly (fp32), for resume states."""

    @abc.abstractmethod
    def load_trainable_state(self, model: SDModel, state: dict[str, torch.Tensor]) -> None:
        """Put tensors written by trainable_state back (resume)."""

    def extra_state(self) -> dict[str, Any] | None:
        """Anything else the method must restore to continue exactly (plain values and tensors), or None."""
        return None

    def load_extra_state(self, state: dict[str, Any] | None) -> None:
        """Put what `extra_state` returned back (resume)."""

    def save_optimizer_sidecar(self, result: Path, optimizer: torch.optim.Optimizer) -> None:
        """Write optimizer state next to a saved result, for formats whose tools expect one (A1111's `.optim`)."""

    @abc.abstractmethod
    def save_result(self, model: SDModel, stem: Path, ctx: SaveContext) -> Path:
        """Write the artefact users load (checkpoint, LoRA, embedding, ...) at `stem` + the right suffix."""

    @abc.abstractmethod
    def estimate_kind(self) -> tuple[str, dict[str, Any]]:
        """What the method trains, for the --dry-run estimate: (kind for library.estimate, its extra fields)."""
