"""Held-out validation loss (`data.validation_split`, `train.validate_every_n_steps`): one number that is comparable
between evaluations, runs and resumes.

What is measured: the training loss (the run's loss type and weighting: huber, min-SNR, debiased, masks, as
`Objective.loss` computes it) of every validation sample at `VALIDATION_TIMESTEPS` fixed noise levels, with plain
Gaussian noise drawn from a generator seeded by (validation seed, sample id, level), averaged over samples and levels.
Timesteps and noise do not change between evaluations, so the figure moves only when the weights do; sd-scripts made the
same choice ("stable timesteps", "stable noise", kohya-ss/sd-scripts PR #1903) after a randomly drawn validation loss
proved too noisy to read. Training's noise options (offset, pyramid, input perturbation, timestep shift, min/max
sampling) shape what is learned, not what is measured, and are left out; the fixed levels are spread over
[noise.min_timestep, noise.max_timestep). The loss at each level is returned too: averaging levels hides that the high
and low noise levels move differently (OneTrainer issue #772).

Nothing here touches a global random state, so a validation run never shifts training's draws, and its result at
step N is the same whether or not the run was resumed (it depends only on the weights at step N).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from library.diffusion.objective import Objective, Prepared

VALIDATION_TIMESTEPS = 4  # 125, 375, 625, 875 on SD's 1000 steps: low, two middle and one high noise level


@dataclass(frozen=True)
class ValidationResult:
    loss: float  # mean over samples and levels: log as `loss/validation`
    per_timestep: dict[int, float]  # mean over samples at each level: `loss/validation_t{t}`
    samples: int  # validation samples measured (each at every level)


def validation_due(step: int, epoch_end: bool, epoch: int, every_n_steps: int, every_n_epochs: int) -> bool:
    """Whether to validate after optimizer step `step` (1-based; `epoch` 0-based, `epoch_end` when the step finished
    it): every N steps, at the end of every N-th epoch, and at every epoch's end when both are 0 (sd-scripts)."""
    if every_n_steps <= 0 and every_n_epochs <= 0:
        return epoch_end
    return (every_n_steps > 0 and step % every_n_steps == 0) or (
        epoch_end and every_n_epochs > 0 and (epoch + 1) % every_n_epochs == 0)


def validation_timesteps(min_timestep: int, max_timestep: int, count: int = VALIDATION_TIMESTEPS) -> list[int]:
    """`count` timesteps at the midpoints of equal parts of [min_timestep, max_timestep) (sorted, distinct)."""
    span = max_timestep - min_timestep
    return sorted({min_timestep + int((k + 0.5) * span / count) for k in range(count)})


def noise_seed(seed: int, sample_id: int, level: int) -> int:
    """Seed of the noise of one validation sample at one level (independent of batching)."""
    digest = hashlib.sha256(f"validation-noise:{seed}:{sample_id}:{level}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def prepare_at(objective: Objective, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> Prepared:
    """The objective's noising and target at the given timesteps and noise (Objective.at: what `prepare` does after
    drawing them). DDPM timesteps are indices 0..T-1; flow timesteps are the model's k in 1..T, t = k / T."""
    return objective.at(latents, timesteps, noise)


Denoise = Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor]  # (batch, noisy latents, timesteps) -> prediction
Encode = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (pixels, generator) -> latents


@torch.no_grad()
def validation_loss(batches: Iterable[dict], denoise: Denoise, objective: Objective, *, seed: int,
                    encode: Encode | None = None, timesteps: list[int] | None = None,
                    device: torch.device | str | None = None) -> ValidationResult:
    """The validation loss of `batches` (ValidationData batches: `latents` or `pixels`, `sample_ids`, `masks`,
    `loss_weights`, ...), each sample at each of `timesteps` (default `validation_timesteps` over the objective's
    noise.min_timestep / max_timestep; flow: the model timesteps k = t + 1).

    `denoise` runs the model as training does (text conditioning, SDXL size conditioning, autocast); `encode` turns
    `pixels` into latents when they are not cached, given a generator seeded per batch. Put trained modules in eval
    mode around the call (dropout) and back after. `device`: where latents / pixels / masks are moved first (None:
    where they are). Returns a ValidationResult; samples = 0 when `batches` is empty.
    """
    n = objective.noise_cfg
    if timesteps is None:
        timesteps = validation_timesteps(n.min_timestep, n.max_timestep)
        if objective.prediction_type == "flow":
            timesteps = [t + 1 for t in timesteps]
    sums = {t: 0.0 for t in timesteps}
    count = 0
    for b, batch in enumerate(batches):
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) and k != "sample_ids" else v
                     for k, v in batch.items()}
        if "latents" in batch:
            latents = batch["latents"]
        elif encode is not None:  # the VAE's posterior sample, seeded per batch (the batches are fixed)
            latents = encode(batch["pixels"], torch.Generator().manual_seed(noise_seed(seed, -1 - b, 0)))
        else:
            raise ValueError("a validation batch holds pixels, but no encode function was given")
        latents = latents.float()
        ids = [int(i) for i in batch["sample_ids"]]
        masks = batch.get("masks")
        weights = batch.get("loss_weights")
        for level, t in enumerate(timesteps):
            noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                noise_seed(seed, i, level))) for i in ids]).to(latents.device)
            prepared = prepare_at(objective, latents, torch.full((len(ids),), t, dtype=torch.long), noise)
            pred = denoise(batch, prepared.noisy_latents, prepared.timesteps)
            _, per_sample = objective.loss(pred.float(), prepared,
                                           masks=None if masks is None else masks.to(latents.device),
                                           weights=None if weights is None else weights.to(latents.device))
            sums[t] += float(per_sample.double().sum())
        count += len(ids)
    if count == 0:
        return ValidationResult(float("nan"), {t: float("nan") for t in timesteps}, 0)
    per_t = {t: s / count for t, s in sums.items()}
    return ValidationResult(sum(per_t.values()) / len(per_t), per_t, count)
