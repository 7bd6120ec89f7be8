"""Training targets and the per-sample loss.

The per-sample loss is built in ONE order (`per_sample_loss`):
  1. element-wise loss between prediction and target, in float32 (l2 / l1 / huber / smooth_l1, with c per sample
     from the Huber schedule);
  2. reduction to one value per sample: the mean over C, H, W, or with a mask [B, 1, H, W] the mask-weighted mean
     over the masked area (sum(loss * mask) / (C * sum(mask)); a sample whose mask is empty gets 0);
  3. timestep weights: min-SNR-gamma, then debiased estimation (both multiply, so together they compose);
  4. per-sample weights (prior-preservation weight, dataset loss weights).
The training loss is the batch mean of the result. Steps 3 and 4 are multiplications, so their order changes nothing;
the mask comes before them so a weight scales a sample's masked mean, not its pixels.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]

# kohya PR #889 (followed by OneTrainer): SNR is clipped at 1000 before debiased estimation. SD's SNR at t = 0 is
# ~1175; without the clip the weight varies fastest exactly where the loss is noisiest.
DEBIASED_SNR_CLIP = 1000.0


def epsilon_target(noise: torch.Tensor) -> torch.Tensor:
    """Epsilon prediction regresses the noise itself (Ho et al. 2020, eq. 14)."""
    return noise


def v_target(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, arXiv 2202.00512, sec. 4), as diffusers'
    DDPMScheduler.get_velocity; `alphas_cumprod_t` is abar at each sample's timestep, shape [B]."""
    abar = alphas_cumprod_t.to(latents.device).float().view(-1, 1, 1, 1)
    return (abar.sqrt() * noise.float() - (1.0 - abar).sqrt() * latents.float()).to(latents.dtype)


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow velocity d x_t / d t = eps - x0 for x_t = (1 - t) x0 + t eps (Esser et al. 2024, SD3,
    arXiv 2403.03206, sec. 2 eq. 1 with the conditional flow matching loss of eq. 6; as diffusers' SD3 trainer)."""
    return noise - latents


def huber_c_schedule(
    schedule: HuberSchedule,
    *,
    timesteps: torch.Tensor,
    sigmas_t: torch.Tensor,
    huber_c: float,
    huber_scale: float = 1.0,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Per-sample Huber threshold c [B], as sd-scripts `get_huber_threshold_if_needed` (Khrapov & Gu 2024,
    "Improving diffusion models's data-corruption resistance using scheduled pseudo-Huber loss", arXiv 2403.16728).

    constant:    c = huber_c * huber_scale
    exponential: c = huber_scale * exp(-a t), a = -ln(huber_c) / T, so c(0) = huber_scale, c(T) = huber_c * huber_scale
    snr:         c = (1 - huber_c) / (1 + sigma_t)**2 + huber_c, sigma_t = sqrt((1 - abar) / abar): ~1 at low noise,
                 huber_c at high noise (sd-scripts ignores huber_scale here, and so do we)
    """
    match schedule:
        case "constant":
            return torch.full(timesteps.shape, huber_c * huber_scale, dtype=torch.float32, device=timesteps.device)
        case "exponential":
            a = -math.log(huber_c) / num_train_timesteps
            return huber_scale * torch.exp(-a * timesteps.float())
        case "snr":
            return ((1.0 - huber_c) / (1.0 + sigmas_t.float()) ** 2 + huber_c).to(timesteps.device)
        case _:
            raise ValueError(f"unknown huber schedule {schedule!r}: expected 'constant', 'exponential' or 'snr'")


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: LossType, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss per element, float32, same shape as pred. With d = pred - target and c per sample ([B]):

    l2:        d**2
    l1:        |d|
    huber:     2 c (sqrt(d**2 + c**2) - c)   pseudo-Huber as sd-scripts `conditional_loss`: -> 2 c |d| for c << |d|,
                                             -> d**2 (= l2) for c >> |d|
    smooth_l1: 2 (sqrt(d**2 + c**2) - c)     -> 2 |d| for c << |d|, -> d**2 / c for c >> |d|
    """
    d = pred.float() - target.float()
    match loss_type:
        case "l2":
            return d * d
        case "l1":
            return d.abs()
        case "huber" | "smooth_l1":
            if huber_c is None:
                raise ValueError(f"loss_type {loss_type!r} needs huber_c")
            c = huber_c.to(d.device).float().view(-1, *([1] * (d.dim() - 1)))
            # sqrt(d^2 + c^2) - c written as d^2 / (sqrt(d^2 + c^2) + c): the same value without the float32
            # cancellation of the direct form when c >> |d|.
            pseudo = d * d / (torch.sqrt(d * d + c * c) + c)
            return 2.0 * c * pseudo if loss_type == "huber" else 2.0 * pseudo
        case _:
            raise ValueError(f"unknown loss_type {loss_type!r}: expected 'l2', 'l1', 'huber' or 'smooth_l1'")


def masked_mean(loss: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean [B] of loss [B, C, H, W]; with mask [B, 1, H, W] (values in [0, 1], at latent size) the
    mask-weighted mean over the masked area. An all-zero mask gives 0 for that sample (nothing to learn there)."""
    if mask is None:
        return loss.mean(dim=tuple(range(1, loss.dim())))
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != loss.shape[0] or mask.shape[2:] != loss.shape[2:]:
        raise ValueError(f"mask must be [B, 1, H, W] = {[loss.shape[0], 1, *loss.shape[2:]]}, got {list(mask.shape)}")
    mask = mask.to(loss.device).float()
    total = (loss * mask).sum(dim=(1, 2, 3))
    area = mask.sum(dim=(1, 2, 3)) * loss.shape[1]
    return total / area.clamp(min=1e-8)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023, arXiv 2303.09556, sec. 3.4): the x0 loss weight min(SNR, gamma),
    expressed for the loss actually computed. epsilon: min(SNR, g) / SNR; v: min(SNR, g) / (SNR + 1).
    (epsilon loss = SNR * x0 loss, v loss = (SNR + 1) * x0 loss.) SNR = 0 (zero terminal SNR, v only) gives 0."""
    snr = snr.float()
    match prediction_type:
        case "epsilon":
            # min(snr, g) / snr written as min(1, g / snr): also 1 (its limit) at snr = inf.
            return (gamma / snr).clamp(max=1.0)
        case "v_prediction":
            return snr.clamp(max=gamma) / (snr + 1.0)
        case _:
            raise ValueError(f"min-SNR weighting is defined for 'epsilon' and 'v_prediction', not {prediction_type!r}")


def debiased_weight(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation weight (Yu et al. 2023, arXiv 2310.08442, sec. 4: 1 / sqrt(SNR) on the epsilon loss),
    with SNR clipped at 1000 (kohya PR #889, OneTrainer).

    epsilon: 1 / sqrt(SNR), exactly sd-scripts `apply_debiased_estimation`.
    v:       sqrt(SNR) / (SNR + 1). Departure from sd-scripts (1 / (SNR + 1)) and OneTrainer (1 / sqrt(SNR + 1)):
             the v loss is (SNR + 1) / SNR times the epsilon loss of the same prediction, so this is the paper's
             weight carried over exactly, the same conversion Hang et al. use for min-SNR's v form; a v model then
             optimises the same weighted objective as an epsilon model. sd-scripts' v weight amounts to 1 / SNR on
             the epsilon loss, far stronger than the paper's 1 / sqrt(SNR). At SNR = 0 (zero terminal SNR) it is 0.
    """
    snr = snr.float().clamp(max=DEBIASED_SNR_CLIP)
    match prediction_type:
        case "epsilon":
            return snr.rsqrt()
        case "v_prediction":
            return snr.sqrt() / (snr + 1.0)
        case _:
            raise ValueError(f"debiased estimation is defined for 'epsilon' and 'v_prediction', not {prediction_type!r}")


def per_sample_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    loss_type: LossType = "l2",
    huber_c: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    snr: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
    debiased_estimation: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss [B] (float32) in the order of the module docstring. `snr` [B] is needed by the SNR weights."""
    loss = masked_mean(elementwise_loss(pred, target, loss_type, huber_c), mask)
    if min_snr_gamma is not None or debiased_estimation:
        if snr is None:
            raise ValueError("min-SNR and debiased weights need the per-sample snr")
        snr = snr.to(loss.device)
        if min_snr_gamma is not None:
            loss = loss * min_snr_weight(snr, min_snr_gamma, prediction_type)
        if debiased_estimation:
            loss = loss * debiased_weight(snr, prediction_type)
    if weights is not None:
        loss = loss * weights.to(loss.device).float().view(-1)
    return loss
