"""The hooks through which a training method (full fine-tune, LoRA, textual inversion, ...) plugs into the one loop.

The loop (library/training/loop.py) owns everything that is the same for every method: data, noise, loss,
precision, accumulation, optimizer and scheduler steps, EMA, NaN guard, saving, resuming, sampling, logging.
A method says only what is different: which parameters train, what "the result" is and how it is written.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch

from library.models.model import SDModel


class Method(abc.ABC):
    """Base class: four abstract hooks every method fills, and defaults for the optional ones."""

    name = "base"

    @abc.abstractmethod
    def setup(self, model: SDModel) -> list[dict[str, Any]]:
        """Freeze / inject / unfreeze; return optimizer param groups: dicts with "params", "lr" and "name"."""

    def bind_data(self, info: dict[str, Any]) -> None:
        """Told once, before training, what the data is (`tag_frequency`, `datasets`, `num_train_images`) — for
        metadata such as kohya's ss_tag_frequency."""

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

    def save_optimizer_sidecar(self, result: Path, optimizer: torch.optim.Optimizer) -> None:
        """Write optimizer state next to a saved result, for formats whose tools expect one (A1111's `.optim`)."""

    @abc.abstractmethod
    def save_result(self, model: SDModel, stem: Path, metadata: dict[str, str]) -> Path:
        """Write the artefact users load (checkpoint, LoRA, embedding, ...) at `stem` + the right suffix."""
