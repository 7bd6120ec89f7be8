"""`[noise]` and `[loss]`: how training noise, timesteps and the per-sample loss are made.

The math lives in library/diffusion/ (schedule, noise, loss); these tables only name the choices.
No torch here: config modules stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from library.config.fields import opt
from library.errors import ConfigError

TimestepSampling = Literal["uniform", "logit_normal", "mode"]
FlowWeighting = Literal["none", "sigma_sqrt", "cosmap"]
LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
# "flow" (rectified flow, SD3-style) is ours in addition to the two DDPM prediction types of library.models.families.
ObjectivePrediction = Literal["epsilon", "v_prediction", "flow"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow")

# sd-scripts argument name -> our "table.key", for the loader's kohya-compatible names.
KOHYA_NAMES: dict[str, str] = {
    "noise_offset": "noise.offset",
    "adaptive_noise_scale": "noise.adaptive_offset",
    "noise_offset_random_strength": "noise.offset_random_strength",
    "multires_noise_iterations": "noise.pyramid_iterations",
    "multires_noise_discount": "noise.pyramid_discount",
    "ip_noise_gamma": "noise.input_perturbation",
    "ip_noise_gamma_random_strength": "noise.input_perturbation_random_strength",
    "zero_terminal_snr": "noise.zero_terminal_snr",
    "min_timestep": "noise.min_timestep",
    "max_timestep": "noise.max_timestep",
    "loss_type": "loss.loss_type",
    "huber_c": "loss.huber_c",
    "huber_schedule": "loss.huber_schedule",
    "huber_scale": "loss.huber_scale",
    "min_snr_gamma": "loss.min_snr_gamma",
    "debiased_estimation_loss": "loss.debiased_estimation",
    # sd-scripts' SD3 options (sd3_train_utils.add_sd3_training_arguments); its --weighting_scheme names a sampling
    # density or a weight in one option, which here are noise.timestep_sampling and loss.flow_weighting.
    "logit_mean": "noise.logit_mean",
    "logit_std": "noise.logit_std",
    "mode_scale": "noise.mode_scale",
    "training_shift": "noise.timestep_shift",
}


@dataclass
class NoiseConfig:
    """`[noise]`: the noise added to latents and the timesteps it is added at."""

    offset: float = opt(0.0, "offset noise strength (crosslabs; sd-scripts noise_offset); 0 = off, ~0.05-0.1 typical")
    adaptive_offset: float = opt(
        0.0, "adds this times |per-channel latent mean| to the offset (sd-scripts adaptive_noise_scale); needs offset > 0"
    )
    offset_random_strength: bool = opt(False, "scale the offset by U(0,1) per sample")
    pyramid_iterations: int = opt(0, "pyramid / multires noise levels (Whitaker; sd-scripts multires_noise_iterations)")
    pyramid_discount: float = opt(0.4, "weight of each coarser pyramid level is discount**level (0 < d <= 1)")
    input_perturbation: float = opt(
        0.0, "input perturbation gamma (Ning et al. 2023): noise fed to the model only; paper uses 0.1, 0 = off"
    )
    input_perturbation_random_strength: bool = opt(False, "scale the input perturbation by U(0,1) per sample")
    zero_terminal_snr: bool = opt(
        False, "rescale betas to zero terminal SNR (Lin et al. 2023); needs model.prediction_type = 'v_prediction'"
    )
    min_timestep: int = opt(0, "smallest training timestep (inclusive)")
    max_timestep: int = opt(1000, "largest training timestep (exclusive); at most the model's num_train_timesteps")
    timestep_sampling: TimestepSampling = opt(
        "uniform", "'uniform', 'logit_normal' (SD3, Esser et al. 2024 sec. 3.1) over [min_timestep, max_timestep), "
        "or 'mode' (SD3 eq. 20; flow models only)"
    )
    logit_mean: float = opt(0.0, "mean of the normal behind logit_normal sampling")
    logit_std: float = opt(1.0, "standard deviation of the normal behind logit_normal sampling")
    mode_scale: float = opt(1.29, "scale s of 'mode' sampling (SD3 eq. 20; diffusers' default 1.29); -1 <= s <= 1.75")
    timestep_shift: float = opt(
        1.0, "multiply every sampled noise level sigma by this (> 1: noisier); 1 = off; flow models (SD3): on top of "
        "the model's own shift (3.0), sd-scripts' training_shift"
    )
    resolution_shift: bool = opt(
        False, "also multiply sigma by (image side / native side), NovelAI V3's rule; levels past the DDPM schedule's "
        "top are not drawn (zero_terminal_snr trains the top)"
    )

    def validate(self) -> None:
        if self.offset < 0:
            raise ConfigError(f"noise.offset = {self.offset} must be >= 0 (0 turns offset noise off)")
        if self.adaptive_offset != 0 and self.offset == 0:
            raise ConfigError("noise.adaptive_offset needs noise.offset > 0 (sd-scripts rule: it adjusts the offset)")
        if self.pyramid_iterations < 0:
            raise ConfigError(f"noise.pyramid_iterations = {self.pyramid_iterations} must be >= 0 (0 = off)")
        if not 0 < self.pyramid_discount <= 1:
            raise ConfigError(f"noise.pyramid_discount = {self.pyramid_discount} must be in (0, 1]")
        if self.input_perturbation < 0:
            raise ConfigError(f"noise.input_perturbation = {self.input_perturbation} must be >= 0 (0 = off)")
        if not 0 <= self.min_timestep < self.max_timestep:
            raise ConfigError(
                f"noise.min_timestep = {self.min_timestep} and noise.max_timestep = {self.max_timestep}: "
                "need 0 <= min_timestep < max_timestep"
            )
        if self.logit_std <= 0:
            raise ConfigError(f"noise.logit_std = {self.logit_std} must be > 0")
        if not -1.0 <= self.mode_scale <= 2.0 / (3.141592653589793 - 2.0):
            raise ConfigError(f"noise.mode_scale = {self.mode_scale} must be in [-1, 1.75] (SD3 sec. 3.1: outside it "
                              "eq. 20 is not a density)")
        if self.timestep_shift <= 0:
            raise ConfigError(f"noise.timestep_shift = {self.timestep_shift} must be > 0 (1 = no shift)")


@dataclass
class LossConfig:
    """`[loss]`: the per-sample loss and its weights (applied in the order documented in library/diffusion/loss.py)."""

    loss_type: LossType = opt("l2", "'l2', 'l1', 'huber' or 'smooth_l1' (pseudo-Huber forms as sd-scripts)")
    huber_c: float = opt(0.1, "Huber threshold c (for 'exponential' and 'snr' schedules: the value at t = T)")
    huber_schedule: HuberSchedule = opt("snr", "how c varies with the timestep: 'constant', 'exponential' or 'snr'")
    huber_scale: float = opt(1.0, "multiplies c for the 'constant' and 'exponential' schedules (sd-scripts huber_scale)")
    min_snr_gamma: float | None = opt(None, "min-SNR-gamma weighting (Hang et al. 2023), 5 is the paper's choice")
    debiased_estimation: bool = opt(False, "debiased estimation weighting (Yu et al. 2023): 1/sqrt(SNR) on eps loss")
    flow_weighting: FlowWeighting = opt(
        "none", "flow models (SD3): 'none', 'sigma_sqrt' (t^-2) or 'cosmap' loss weight (diffusers' SD3 trainer)"
    )

    def validate(self) -> None:
        if self.huber_c <= 0:
            raise ConfigError(f"loss.huber_c = {self.huber_c} must be > 0")
        if self.huber_schedule == "exponential" and self.huber_c > 1 and self.loss_type in ("huber", "smooth_l1"):
            raise ConfigError(
                f"loss.huber_c = {self.huber_c} must be <= 1 with loss.huber_schedule = 'exponential' "
                "(c decays from huber_scale at t = 0 to huber_c * huber_scale at t = T)"
            )
        if self.huber_scale <= 0:
            raise ConfigError(f"loss.huber_scale = {self.huber_scale} must be > 0")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ConfigError(f"loss.min_snr_gamma = {self.min_snr_gamma} must be > 0 (leave it out to turn it off)")


def check_prediction_compat(
    noise_cfg: NoiseConfig, prediction_type: str, loss_cfg: LossConfig | None = None
) -> None:
    """Cross-table rules between `[noise]` / `[loss]` and `model.prediction_type`; the lead calls it at load.

    Zero terminal SNR makes the last timestep pure noise, where an epsilon target carries no information about the
    image (Lin et al. arXiv 2305.08891 sec. 3.2), so it needs v-prediction. Rectified flow has no betas to rescale.
    SNR-based weights are defined here for the DDPM targets only.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"model.prediction_type = {prediction_type!r} is not one of {', '.join(map(repr, PREDICTION_TYPES))}"
        )
    if prediction_type == "flow" and noise_cfg.zero_terminal_snr:
        raise ConfigError(
            "noise.zero_terminal_snr rescales DDPM betas; a rectified-flow model (SD3) has none and already ends at "
            "pure noise (t = 1): set noise.zero_terminal_snr = false"
        )
    if prediction_type != "flow" and noise_cfg.timestep_sampling == "mode":
        raise ConfigError(
            f"noise.timestep_sampling = 'mode' is SD3's rectified-flow density (model.prediction_type is "
            f"{prediction_type!r}): use 'uniform' or 'logit_normal'"
        )
    if loss_cfg is not None and prediction_type != "flow" and loss_cfg.flow_weighting != "none":
        raise ConfigError(
            f"loss.flow_weighting = {loss_cfg.flow_weighting!r} is for rectified-flow models (SD3), not "
            f"{prediction_type!r}: remove it (for DDPM models see loss.min_snr_gamma / loss.debiased_estimation)"
        )
    if noise_cfg.zero_terminal_snr and prediction_type != "v_prediction":
        raise ConfigError(
            f"noise.zero_terminal_snr = true needs model.prediction_type = 'v_prediction' "
            f"(it is {prediction_type!r}): set model.prediction_type = 'v_prediction' or noise.zero_terminal_snr = false"
        )
    if loss_cfg is not None and prediction_type == "flow":
        if loss_cfg.min_snr_gamma is not None:
            raise ConfigError(
                "loss.min_snr_gamma is defined for model.prediction_type 'epsilon' / 'v_prediction', not 'flow': "
                "remove loss.min_snr_gamma"
            )
        if loss_cfg.debiased_estimation:
            raise ConfigError(
                "loss.debiased_estimation is defined for model.prediction_type 'epsilon' / 'v_prediction', "
                "not 'flow': set loss.debiased_estimation = false"
            )
