"""SD3's rectified-flow training choices as pure functions: timestep density, time shift, loss weighting.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3,
arXiv 2403.03206): sec. 3.1 (eq. 19 logit-normal and eq. 20 mode sampling of t, and the "cosmap" density of
eq. 21), sec. 5.3.2 (eq. 23: the resolution-dependent shift t' = a t / (1 + (a - 1) t) with a = sqrt(m / n)).
The loss weights are those of diffusers' training_utils `compute_loss_weighting_for_sd3` ("sigma_sqrt": t^-2,
"cosmap": 2 / (pi (1 - 2t + 2t^2))), written in terms of the flow time t (diffusers' "sigma" for flow models).
Noising x_t = (1 - t) x0 + t eps and the velocity target eps - x0 are in noise.py / loss.py; `Objective` combines
them. The model's own shift (SD3: `shift` = 3.0 in its scheduler config) is applied on top of `noise.timestep_shift`;
`noise.resolution_shift` multiplies it by eq. 23's a = sqrt(m / n) (schedule.resolution_shift: canvas side over the
native side, which is sqrt of the pixel-count ratio).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

FlowWeighting = Literal["none", "sigma_sqrt", "cosmap"]
# eq. 20 keeps f_mode monotone, i.e. a density on [0, 1], for -1 <= s <= 2 / (pi - 2) (sec. 3.1).
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)


def mode_times(u: torch.Tensor, mode_scale: float) -> torch.Tensor:
    """SD3 eq. 20, "mode sampling with heavy tails": f(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u) for uniform u.

    s = 0 is uniform; s > 0 puts more samples at middle times (diffusers' examples default s = 1.29). Same
    expression as diffusers' `compute_density_for_timestep_sampling(weighting_scheme="mode")`.
    """
    if not -1.0 <= mode_scale <= MODE_SCALE_MAX:
        raise ValueError(f"mode_scale {mode_scale} outside [-1, {MODE_SCALE_MAX:.4f}] (SD3 sec. 3.1)")
    return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)


def sample_mode_times(batch_size: int, generator: torch.Generator, num_train_timesteps: int, *, min_timestep: int,
                      max_timestep: int, mode_scale: float, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps long [B], t float64 [B]) drawn with `mode_times`, mapped into [min_timestep, max_timestep),
    shifted and snapped to the grid t = k / T exactly as schedule.sample_flow_times does for its densities."""
    from library.diffusion.schedule import shift_flow_times

    u = torch.rand(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
    t = mode_times(u, mode_scale).clamp(0.0, 1.0 - 1e-12)
    t = shift_flow_times((min_timestep + t * (max_timestep - min_timestep)) / num_train_timesteps, shift)
    k = (t * num_train_timesteps).floor().long().clamp(min_timestep, max_timestep - 1) + 1
    return k, k.to(torch.float64) / num_train_timesteps


def flow_loss_weight(scheme: FlowWeighting, t: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight at flow time t in (0, 1] (float32), as diffusers' compute_loss_weighting_for_sd3."""
    t = t.double()
    match scheme:
        case "none":
            w = torch.ones_like(t)
        case "sigma_sqrt":
            w = t ** -2.0
        case "cosmap":
            w = 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t ** 2))
        case _:
            raise ValueError(f"unknown flow weighting {scheme!r} (none, sigma_sqrt, cosmap)")
    return w.float()


def model_shift(scheduler_config: dict | None) -> float:
    """The shift a flow model was trained with: its FlowMatchEulerDiscreteScheduler `shift` (SD3: 3.0); 1 when the
    config names none. A config with `use_dynamic_shifting` (Flux's resolution-dependent mu) is not SD3's rule."""
    config = scheduler_config or {}
    if config.get("use_dynamic_shifting"):
        raise ValueError("scheduler config uses dynamic shifting (Flux-style); SD3's fixed shift does not apply")
    return float(config.get("shift", 1.0))
