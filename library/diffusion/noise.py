"""Training noise: offset noise, adaptive offset, pyramid (multires) noise, input perturbation; and noising.

`make_noise` returns two tensors: the noise fed to the model input and the noise the target is built from. They
differ only by input perturbation (Ning et al. 2023, arXiv 2301.11706, sec. 4: the network input is noised with
eps + gamma * xi while the loss still regresses eps).

Random draws come from the generator passed in, always in this order so a seed reproduces a batch: base noise,
offset strengths, offset noise, pyramid levels (scale then noise, per level), perturbation strengths, perturbation
noise. Draws happen on the generator's device in float32 and are moved to the latents' device and dtype, so a CPU
generator also works for CUDA latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)


def offset_noise(
    noise: torch.Tensor,
    latents: torch.Tensor,
    generator: torch.Generator,
    *,
    offset: float,
    adaptive_offset: float = 0.0,
    random_strength: bool = False,
) -> torch.Tensor:
    """noise + offset * N(0, 1) per sample and channel, constant over the image.

    Offset noise (N. Guttenberg, crosslabs.org "Diffusion with offset noise", 2023) lets the model change an image's
    mean colour. As sd-scripts `apply_noise_offset`: with `random_strength` the offset is scaled by U(0, 1) (we draw
    one per sample, sd-scripts one per batch); `adaptive_offset` adds adaptive_offset * |mean of the latent channel|
    (sd-scripts `adaptive_noise_scale`), clamped at 0 because the scale may be negative.
    """
    b, c = noise.shape[:2]
    strength = torch.full((b, 1, 1, 1), float(offset), dtype=torch.float32, device=generator.device)
    if random_strength:
        strength = strength * _rand((b, 1, 1, 1), generator)
    strength = strength.to(noise.device)
    if adaptive_offset:
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = (strength + adaptive_offset * channel_mean).clamp(min=0.0)
    per_channel = _randn((b, c, 1, 1), generator).to(noise.device)
    return noise + strength * per_channel


def pyramid_noise(
    noise: torch.Tensor, generator: torch.Generator, *, iterations: int, discount: float = 0.4
) -> torch.Tensor:
    """Pyramid / multi-resolution noise (J. Whitaker, "Multi-resolution noise for diffusion model training", 2023;
    behaviour of sd-scripts `pyramid_noise_like`).

    Level i adds N(0, 1) noise drawn at size (H, W) / r**i, r ~ U(2, 4) per level, upsampled bilinearly to (H, W)
    and weighted by discount**i; it stops after the level that reaches 1 pixel on a side. The sum is divided by its
    standard deviation to come back to unit variance; departure from sd-scripts: per sample (sd-scripts divides by the
    std of the whole batch), so a sample's noise does not depend on what else is in its batch.
    """
    b, c, h, w = noise.shape
    out = noise.float()
    for level in range(iterations):
        r = 2.0 + 2.0 * _rand((1,), generator).item()
        hn, wn = max(1, int(h / r**level)), max(1, int(w / r**level))
        coarse = _randn((b, c, hn, wn), generator).to(noise.device)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**level
        if hn == 1 or wn == 1:
            break
    return out / out.std(dim=(1, 2, 3), keepdim=True)


def make_noise(
    latents: torch.Tensor,
    generator: torch.Generator,
    *,
    offset: float = 0.0,
    adaptive_offset: float = 0.0,
    offset_random_strength: bool = False,
    pyramid_iterations: int = 0,
    pyramid_discount: float = 0.4,
    input_perturbation: float = 0.0,
    input_perturbation_random_strength: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_noise, target_noise) for latents [B, C, H, W], in the latents' dtype and device.

    Order as sd-scripts `get_noise_noisy_latents_and_timesteps`: Gaussian noise, then offset noise, then pyramid
    noise (which renormalises, so it also rescales the offset), giving the target noise; input perturbation is added
    last and only to the input noise. With every option at 0 both are the same N(0, 1) tensor.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    noise = _randn(tuple(latents.shape), generator).to(latents.device)
    if offset:
        noise = offset_noise(
            noise, latents, generator, offset=offset, adaptive_offset=adaptive_offset,
            random_strength=offset_random_strength,
        )
    if pyramid_iterations:
        noise = pyramid_noise(noise, generator, iterations=pyramid_iterations, discount=pyramid_discount)
    input_noise = noise
    if input_perturbation:
        b = latents.shape[0]
        gamma = torch.full((b, 1, 1, 1), float(input_perturbation), dtype=torch.float32, device=generator.device)
        if input_perturbation_random_strength:
            # sd-scripts `ip_noise_gamma_random_strength` scales gamma by U(0, 1); we draw one per sample.
            gamma = gamma * _rand((b, 1, 1, 1), generator)
        xi = _randn(tuple(latents.shape), generator)
        input_noise = noise + (gamma * xi).to(latents.device)
    return input_noise.to(latents.dtype), noise.to(latents.dtype)


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, arXiv 2006.11239, eq. 4), computed in float32
    and returned in the latents' dtype, as diffusers' DDPMScheduler.add_noise."""
    abar = alphas_cumprod.to(latents.device)[timesteps.to(latents.device)].float().view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents.float() + (1.0 - abar).sqrt() * noise.float()
    return noisy.to(latents.dtype)


def add_flow_noise(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_t = (1 - t) x0 + t eps (Liu et al. 2022, arXiv 2209.03003; Esser et al. 2024, SD3, sec. 2)."""
    t = t.to(latents.device).float().view(-1, 1, 1, 1)
    return ((1.0 - t) * latents.float() + t * noise.float()).to(latents.dtype)
