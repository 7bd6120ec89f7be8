"""Noise schedules: DDPM betas as Stable Diffusion uses them, zero-terminal-SNR rescale, SNR / sigma tables,
timestep sampling and the resolution-dependent shift.

Notation (Ho et al. 2020, arXiv 2006.11239, eq. 4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with
abar_t = prod_{s<=t} (1 - beta_s). SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, arXiv 2107.00630, eq. 1).
sigma(t) = sqrt((1 - abar_t) / abar_t) = 1 / sqrt(SNR) is the noise level of the same process written in the
variance-exploding form x_t / sqrt(abar_t) = x0 + sigma eps (Karras et al. 2022, EDM, arXiv 2206.00364, sec. 2 and
table 1); it is the sigma k-diffusion, A1111 and the NovelAI V3 report speak in (SD's sigma_max = 14.6).

Rectified flow ("flow") uses continuous times t in (0, 1]: x_t = (1 - t) x0 + t eps, whose sigma is t / (1 - t).

All tables are computed in float64 (the rescale and the cumulative product lose digits in float32) and converted by
the caller. Everything here is a pure function; randomness comes from the generator passed in.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

BetaSchedule = Literal["scaled_linear", "linear"]
TimestepSampling = Literal["uniform", "logit_normal"]

SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_NUM_TRAIN_TIMESTEPS = 1000


def make_betas(
    num_train_timesteps: int = SD_NUM_TRAIN_TIMESTEPS,
    beta_start: float = SD_BETA_START,
    beta_end: float = SD_BETA_END,
    beta_schedule: BetaSchedule = "scaled_linear",
) -> torch.Tensor:
    """DDPM betas [T] in float64.

    "scaled_linear" is linear in sqrt(beta), the schedule of the original LDM / SD configs
    (`linear_start: 0.00085, linear_end: 0.012`) and of diffusers' DDPMScheduler(beta_schedule="scaled_linear").
    "linear" is linear in beta (Ho et al. 2020, sec. 4).
    """
    match beta_schedule:
        case "scaled_linear":
            return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        case "linear":
            return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        case _:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}: expected 'scaled_linear' or 'linear'")


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, sec. 2)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has SNR exactly 0 (Lin et al. 2023, arXiv 2305.08891, Algorithm 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged; betas are then recovered
    from the ratios of consecutive abar. The last beta becomes 1 (pure noise).
    """
    sqrt_abar = alphas_cumprod_from_betas(betas).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar / (1 - abar) (Kingma et al. 2021, eq. 1); 0 at a zero-terminal-SNR last step."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma(t) = sqrt((1 - abar) / abar) (Karras et al. 2022, table 1, VP column); inf at zero terminal SNR."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def alphas_cumprod_from_config(scheduler_config: dict, *, zero_terminal_snr: bool = False) -> torch.Tensor:
    """abar table from a diffusers DDPMScheduler-style config dict (keys num_train_timesteps, beta_start, beta_end,
    beta_schedule, rescale_betas_zero_snr; missing keys take SD's values). `zero_terminal_snr` forces the rescale."""
    if scheduler_config.get("trained_betas") is not None:
        betas = torch.tensor(scheduler_config["trained_betas"], dtype=torch.float64)
    else:
        betas = make_betas(
            int(scheduler_config.get("num_train_timesteps", SD_NUM_TRAIN_TIMESTEPS)),
            float(scheduler_config.get("beta_start", SD_BETA_START)),
            float(scheduler_config.get("beta_end", SD_BETA_END)),
            scheduler_config.get("beta_schedule", "scaled_linear"),
        )
    if zero_terminal_snr or scheduler_config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod_from_betas(betas)


def sample_unit_times(
    batch_size: int,
    generator: torch.Generator,
    *,
    sampling: TimestepSampling = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """u in [low, high) per sample, float64 on the generator's device: the distribution below, conditioned on
    [low, high) (one draw per sample either way, so the generator advances the same).

    "uniform": U[0, 1). "logit_normal": sigmoid(n), n ~ N(logit_mean, logit_std) (Esser et al. 2024, SD3,
    arXiv 2403.03206, sec. 3.1 eq. 19), which puts more samples at middle noise levels. The conditioning is the
    inverse-CDF one: u = F^-1(F(low) + v (F(high) - F(low))) with v uniform; for the logit-normal
    F(u) = Phi((logit u - mean) / std), applied to the drawn normal through Phi(n) (torch.special.ndtr / ndtri).
    """
    device = generator.device
    whole = low <= 0.0 and high >= 1.0
    match sampling:
        case "uniform":
            u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
            return u if whole else low + u * (high - low)
        case "logit_normal":
            n = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float64)
            if not whole:
                def cdf(x: float) -> float:  # Phi of the standard normal at the logit of x
                    return 0.0 if x <= 0.0 else 1.0 if x >= 1.0 else (
                        torch.special.ndtr(torch.tensor((math.log(x / (1.0 - x)) - logit_mean) / logit_std,
                                                        dtype=torch.float64)).item())
                a, b = cdf(low), cdf(high)
                n = torch.special.ndtri(a + torch.special.ndtr(n) * (b - a))
            # Clamp below 1 so that u * range never reaches the exclusive upper timestep.
            u = torch.sigmoid(n * logit_std + logit_mean).clamp(max=1.0 - 1e-12)
            return u if whole else u.clamp(low, math.nextafter(high, 0.0))
        case _:
            raise ValueError(f"unknown timestep sampling {sampling!r}: expected 'uniform' or 'logit_normal'")


def resolution_shift(height_px: int, width_px: int, native_resolution: int) -> float:
    """Sigma multiplier for an image of this size: canvas side / native side, with side = sqrt(H * W).

    NovelAI V3 report (Ossa et al. 2024, arXiv 2409.15997, sec. 2.3): sigma_max should double each time the canvas
    side doubles (an upper bound that assumes the extra pixels are fully redundant). 1 at the family's native
    resolution; below 1 for smaller images (the same rule read downwards).
    """
    return math.sqrt(height_px * width_px) / native_resolution


def shift_ddpm_timesteps(timesteps: torch.Tensor, sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Multiply each timestep's sigma by `shift` and return the timestep whose sigma is nearest in log space.

    How the NovelAI rule is mapped onto a DDPM UNet: the UNet only knows timesteps 0..T-1 and their abar, so sigma_max
    itself cannot be raised; instead every sampled sigma is scaled by the same factor (a constant shift of log sigma,
    which is what "double sigma_max" does to the top of a k-diffusion schedule) and snapped back to the table. Here
    targets beyond the table saturate at its ends; `sample_ddpm_timesteps` never draws such a source timestep (see
    `shift_source_range`). `sigmas` must be increasing (it is for every DDPM schedule).
    """
    if shift == 1.0:
        return timesteps
    log_table = sigmas.to(torch.float64).log()
    target = log_table[timesteps] + math.log(shift)
    hi = torch.searchsorted(log_table, target).clamp(max=len(log_table) - 1)
    lo = (hi - 1).clamp(min=0)
    # `target >= log_table[hi]` also catches target = +inf (zero terminal SNR), where the differences are nan.
    take_hi = (target >= log_table[hi]) | ((log_table[hi] - target) < (target - log_table[lo]))
    return torch.where(take_hi, hi, lo)


def shift_flow_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Rectified-flow time with its sigma t / (1 - t) multiplied by `shift`: t' = s t / (1 + (s - 1) t).

    This is SD3's timestep shift (Esser et al. 2024, sec. 5.3.2, eq. 23, with s = sqrt(m / n)), the same log-sigma
    shift as `shift_ddpm_timesteps`, in closed form.
    """
    return shift * t / (1.0 + (shift - 1.0) * t)


def shift_source_range(sigmas: torch.Tensor, shift: float, min_timestep: int, max_timestep: int) -> tuple[int, int]:
    """The source timesteps [lo, hi) whose shifted noise level the table can represent within [min_timestep,
    max_timestep): those whose sigma * shift lies inside the log-sigma cells of the allowed timesteps.

    The cell of a timestep is the range of log sigma that snaps to it (`shift_ddpm_timesteps`): up to the midpoints
    with its neighbours, and at the two ends of the table half its one gap beyond it, so the first and last steps get
    cells as wide as the others instead of everything beyond the table. At zero terminal SNR the last sigma is inf
    and nothing is cut at the top (sigma_max is already infinite). (lo, hi) = (min, max) at shift 1; lo == hi
    when no source fits.
    """
    log_table = sigmas.to(torch.float64).log()
    lo_i, hi_i = min_timestep, max_timestep - 1
    if lo_i > 0:
        lower = (log_table[lo_i - 1] + log_table[lo_i]) / 2
    else:
        lower = log_table[0] - (log_table[1] - log_table[0]) / 2
    if hi_i < len(log_table) - 1:
        upper = (log_table[hi_i] + log_table[hi_i + 1]) / 2
    else:
        upper = log_table[-1] + (log_table[-1] - log_table[-2]) / 2  # inf - finite = inf at zero terminal SNR
    target = log_table[min_timestep:max_timestep] + math.log(shift)
    inside = ((target > lower) & (target <= upper)).nonzero().flatten()
    if len(inside) == 0:
        return min_timestep, min_timestep
    return min_timestep + int(inside[0]), min_timestep + int(inside[-1]) + 1  # contiguous: target is increasing


def sample_ddpm_timesteps(
    batch_size: int,
    generator: torch.Generator,
    sigmas: torch.Tensor,
    *,
    min_timestep: int = 0,
    max_timestep: int | None = None,
    sampling: TimestepSampling = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Integer timesteps (long [B]) in [min_timestep, max_timestep), shifted by `shift` (`shift_ddpm_timesteps`).

    With shift 1 this is sd-scripts' `torch.randint(min_timestep, max_timestep, (B,))` (uniform sampling). With a
    shift, the source timestep is drawn from the same distribution conditioned on its shifted noise level being one
    the allowed range represents (`shift_source_range`), i.e. the shifted distribution truncated to the table and
    renormalised. What the table cannot hold is not trained rather than piled onto the end steps: at shift 2 (a canvas
    side twice the native one) without it 12.7 % of the samples clamped to t = 999; with it t = 999 gets the share
    of its own log-sigma cell, as every other step does. Raising sigma_max itself (NovelAI V3, sec. 2.3) needs
    timesteps the UNet never saw; zero terminal SNR (noise.zero_terminal_snr) is the way to train the top of the
    range, and there nothing is cut. Where no source fits, every sample takes the nearest allowed end step.
    """
    max_timestep = len(sigmas) if max_timestep is None else max_timestep
    span = max_timestep - min_timestep
    lo, hi = min_timestep, max_timestep
    if shift != 1.0:
        lo, hi = shift_source_range(sigmas, shift, min_timestep, max_timestep)
    unit = dict(sampling=sampling, logit_mean=logit_mean, logit_std=logit_std)
    if hi == lo:  # nothing representable: the draw is still made, so the generator advances the same
        sample_unit_times(batch_size, generator, **unit)
        end = max_timestep - 1 if shift > 1.0 else min_timestep
        return torch.full((batch_size,), end, dtype=torch.long, device=generator.device)
    u = sample_unit_times(batch_size, generator, **unit, low=(lo - min_timestep) / span,
                          high=(hi - min_timestep) / span)
    timesteps = ((u * span).floor().long() + min_timestep).clamp(lo, hi - 1)
    timesteps = shift_ddpm_timesteps(timesteps, sigmas.to(timesteps.device), shift)
    return timesteps.clamp(min_timestep, max_timestep - 1)


def sample_flow_times(
    batch_size: int,
    generator: torch.Generator,
    num_train_timesteps: int = SD_NUM_TRAIN_TIMESTEPS,
    *,
    min_timestep: int = 0,
    max_timestep: int | None = None,
    sampling: TimestepSampling = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow times for a batch: (timesteps long [B] for the model, t float64 [B] used for noising).

    t is sampled continuously in [min_timestep / T, max_timestep / T), shifted (`shift_flow_times`), then snapped to
    the grid t = k / T, k = 1..T, that diffusers' FlowMatchEulerDiscreteScheduler trains and samples on (its timestep
    is t * T), so the model sees exactly the t the latents were noised with. The index k - 1 is clamped back into
    [min_timestep, max_timestep) after the shift, like the DDPM indices.
    """
    max_timestep = num_train_timesteps if max_timestep is None else max_timestep
    u = sample_unit_times(batch_size, generator, sampling=sampling, logit_mean=logit_mean, logit_std=logit_std)
    t = shift_flow_times((min_timestep + u * (max_timestep - min_timestep)) / num_train_timesteps, shift)
    k = (t * num_train_timesteps).floor().long().clamp(min_timestep, max_timestep - 1) + 1
    return k, k.to(torch.float64) / num_train_timesteps
