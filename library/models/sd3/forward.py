"""The SD3 denoiser call: `predict_sd3` has the signature of library/models/forward.py `predict`, whose "sd3" branch
calls it.

SD3Transformer2DModel(hidden_states, timestep, encoder_hidden_states, pooled_projections) predicts the flow
velocity (noise - latents) for latents noised as (1 - t) x0 + t eps; `timestep` is t * 1000 as
FlowMatchEulerDiscreteScheduler's timesteps (the loop's timesteps k = 1..1000 are exactly that).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from library.models.model import SDModel


def predict_sd3(model: SDModel, denoiser: Callable, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Any,
                batch: dict[str, Any]) -> torch.Tensor:
    """The velocity prediction for `noisy` [B, 16, h, w] at `timesteps` [B]; conditioning cast to the latents' dtype
    (text encoders may run in another precision than the transformer)."""
    if cond.pooled is None:
        raise ValueError("SD3's transformer needs the pooled text embedding (CLIP-L + CLIP-G projections)")
    dtype, device = noisy.dtype, noisy.device
    return denoiser(
        hidden_states=noisy,
        timestep=timesteps.to(device).float(),
        encoder_hidden_states=cond.hidden.to(device, dtype),
        pooled_projections=cond.pooled.to(device, dtype),
        return_dict=False,
    )[0]
