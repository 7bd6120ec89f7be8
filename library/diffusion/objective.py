"""`Objective`: everything the training loop needs from the diffusion math, behind two calls.

    objective = Objective(cfg.noise, cfg.loss, model.prediction_type, scheduler_config=model.scheduler_config,
                          native_resolution=native_resolution(family, prediction_type, unet_sample_size))
    prepared = objective.prepare(latents, generator)          # noisy latents, timesteps, target
    pred = unet(prepared.noisy_latents, prepared.timesteps, ...).sample
    loss, per_sample = objective.loss(pred, prepared, masks=masks, weights=weights)

prediction_type "epsilon" / "v_prediction" train on the DDPM schedule (library.diffusion.schedule); "flow" trains
rectified flow (x_t = (1 - t) x0 + t eps, target eps - x0, model timestep t * T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.config.diffusion import LossConfig, NoiseConfig
from library.diffusion import flow as F
from library.diffusion import loss as L
from library.diffusion import schedule as S
from library.diffusion.noise import add_flow_noise, add_noise, make_noise
from library.errors import ConfigError


@dataclass
class Prepared:
    """One batch made ready for the model. All tensors are on the latents' device."""

    noisy_latents: torch.Tensor  # model input [B, C, H, W], latents' dtype
    timesteps: torch.Tensor  # long [B], what the UNet is conditioned on
    target: torch.Tensor  # what the prediction is regressed to, [B, C, H, W]
    snr: torch.Tensor  # float32 [B], signal-to-noise ratio of each sample's noise level
    sigmas: torch.Tensor  # float32 [B], noise-to-signal ratio sqrt(1 / snr) (flow: t / (1 - t))


class Objective:
    """Noise, timesteps, target and loss for one training run. Holds only immutable tables built at construction."""

    def __init__(
        self,
        noise_cfg: NoiseConfig,
        loss_cfg: LossConfig,
        prediction_type: str,
        *,
        native_resolution: int,
        scheduler_config: dict | None = None,
        num_train_timesteps: int = S.SD_NUM_TRAIN_TIMESTEPS,
        beta_start: float = S.SD_BETA_START,
        beta_end: float = S.SD_BETA_END,
        beta_schedule: S.BetaSchedule = "scaled_linear",
        vae_scale_factor: int = 8,
    ) -> None:
        """`scheduler_config` (a diffusers DDPMScheduler config dict, e.g. SDModel.scheduler_config) overrides the
        beta arguments; its `rescale_betas_zero_snr` turns the rescale on like `noise.zero_terminal_snr`.
        `native_resolution` (pixels) and `vae_scale_factor` give the image side for `noise.resolution_shift`.
        The prediction type's fit with the noise and loss settings is checked once, by the run plan
        (library/training/plan.py, `check_prediction_compat`), before the model loads."""
        self.noise_cfg = noise_cfg
        self.loss_cfg = loss_cfg
        self.prediction_type = prediction_type
        self.native_resolution = native_resolution
        self.vae_scale_factor = vae_scale_factor
        # Flow models: the shift they were trained with (SD3's scheduler `shift` 3.0), library/diffusion/flow.py.
        self.model_shift = F.model_shift(scheduler_config) if prediction_type == "flow" else 1.0
        config = {
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "beta_schedule": beta_schedule,
            **(scheduler_config or {}),
        }
        self.num_train_timesteps = int(config["num_train_timesteps"])
        if noise_cfg.max_timestep > self.num_train_timesteps:
            raise ConfigError(
                f"noise.max_timestep = {noise_cfg.max_timestep} is above the model's num_train_timesteps "
                f"({self.num_train_timesteps}): lower noise.max_timestep"
            )
        self.alphas_cumprod: torch.Tensor | None = None
        if prediction_type != "flow":
            zero_snr = noise_cfg.zero_terminal_snr or bool(config.get("rescale_betas_zero_snr", False))
            if zero_snr and prediction_type != "v_prediction":
                raise ConfigError(
                    "the model's scheduler config has rescale_betas_zero_snr = true, which needs "
                    f"model.prediction_type = 'v_prediction' (it is {prediction_type!r})"
                )
            self.alphas_cumprod = S.alphas_cumprod_from_config(config, zero_terminal_snr=zero_snr)
            self.snr_table = S.snr_from_alphas_cumprod(self.alphas_cumprod)
            self.sigma_table = S.sigmas_from_alphas_cumprod(self.alphas_cumprod)

    def shift_for(self, latents: torch.Tensor) -> float:
        """Sigma multiplier for this batch: noise.timestep_shift, times the NovelAI resolution rule if enabled."""
        shift = self.noise_cfg.timestep_shift * self.model_shift
        if self.noise_cfg.resolution_shift:
            h, w = latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor
            shift *= S.resolution_shift(h, w, self.native_resolution)
        return shift

    def prepare(self, latents: torch.Tensor, generator: torch.Generator) -> Prepared:
        """Noise the latents at sampled timesteps and build the target (draws: noise first, then timesteps)."""
        n = self.noise_cfg
        input_noise, target_noise = make_noise(
            latents, generator,
            offset=n.offset, adaptive_offset=n.adaptive_offset, offset_random_strength=n.offset_random_strength,
            pyramid_iterations=n.pyramid_iterations, pyramid_discount=n.pyramid_discount,
            input_perturbation=n.input_perturbation,
            input_perturbation_random_strength=n.input_perturbation_random_strength,
        )
        batch = latents.shape[0]
        sampling = dict(
            min_timestep=n.min_timestep, max_timestep=n.max_timestep, sampling=n.timestep_sampling,
            logit_mean=n.logit_mean, logit_std=n.logit_std, shift=self.shift_for(latents),
        )
        if self.prediction_type == "flow":
            if n.timestep_sampling == "mode":
                timesteps, t = F.sample_mode_times(
                    batch, generator, self.num_train_timesteps, min_timestep=n.min_timestep,
                    max_timestep=n.max_timestep, mode_scale=n.mode_scale, shift=sampling["shift"])
            else:
                timesteps, t = S.sample_flow_times(batch, generator, self.num_train_timesteps, **sampling)
        else:
            timesteps = S.sample_ddpm_timesteps(batch, generator, self.sigma_table, **sampling).cpu()
            t = None
        return self.at(latents, timesteps, input_noise, target_noise, t)

    def at(self, latents: torch.Tensor, timesteps: torch.Tensor, input_noise: torch.Tensor,
           target_noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> Prepared:
        """Noise `latents` with `input_noise` at the given timesteps and build the target from `target_noise`
        (default: the same noise): what `prepare` does after its draws, and what a validation pass does at fixed
        timesteps. DDPM timesteps are indices 0..T-1; flow timesteps are the model's k, with t = k / T unless `t`
        (the exact float64 time the draw made) is given."""
        target_noise = input_noise if target_noise is None else target_noise
        device = latents.device
        timesteps = timesteps.cpu()
        if self.prediction_type == "flow":
            t = timesteps.to(torch.float64) / self.num_train_timesteps if t is None else t
            noisy = add_flow_noise(latents, input_noise, t)
            target = L.flow_target(latents, target_noise)
            sigmas = t / (1.0 - t)  # inf at t = 1, like a zero-terminal-SNR step
            snr = ((1.0 - t) / t) ** 2
        else:
            noisy = add_noise(latents, input_noise, timesteps, self.alphas_cumprod)
            match self.prediction_type:
                case "epsilon":
                    target = L.epsilon_target(target_noise)
                case "v_prediction":
                    target = L.v_target(latents, target_noise, self.alphas_cumprod[timesteps])
                case _:
                    raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
            sigmas, snr = self.sigma_table[timesteps], self.snr_table[timesteps]
        return Prepared(noisy_latents=noisy, timesteps=timesteps.to(device), target=target,
                        snr=snr.float().to(device), sigmas=sigmas.float().to(device))

    def loss(
        self,
        pred: torch.Tensor,
        prepared: Prepared,
        *,
        masks: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss = batch mean, per-sample loss [B]), both float32; order in library.diffusion.loss."""
        c = self.loss_cfg
        huber_c = None
        if c.loss_type in ("huber", "smooth_l1"):
            huber_c = L.huber_c_schedule(
                c.huber_schedule, timesteps=prepared.timesteps, sigmas_t=prepared.sigmas, huber_c=c.huber_c,
                huber_scale=c.huber_scale, num_train_timesteps=self.num_train_timesteps,
            )
        if self.prediction_type == "flow" and c.flow_weighting != "none":
            w = F.flow_loss_weight(c.flow_weighting, prepared.timesteps.float() / self.num_train_timesteps)
            weights = w.to(pred.device) if weights is None else weights * w.to(weights.device)
        per_sample = L.per_sample_loss(
            pred, prepared.target,
            loss_type=c.loss_type, huber_c=huber_c, mask=masks, snr=prepared.snr,
            prediction_type=self.prediction_type, min_snr_gamma=c.min_snr_gamma,
            debiased_estimation=c.debiased_estimation, weights=weights,
        )
        return per_sample.mean(), per_sample
