"""SD3 rectified-flow training choices (library/diffusion/flow.py) and their reach through `[noise]` / `[loss]`."""

from __future__ import annotations

import math

import pytest
import torch

from library.config.diffusion import LossConfig, NoiseConfig, check_prediction_compat
from library.diffusion import flow as F
from library.diffusion.objective import Objective
from library.errors import ConfigError

SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def test_mode_times_exact_values():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    got = F.mode_times(u, 1.29)
    want = [1.0, 0.75 - 1.29 * (math.cos(math.pi / 8) ** 2 - 0.75), 0.5, 0.0]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-15, rtol=0)
    assert torch.equal(F.mode_times(u, 0.0), 1.0 - u)  # s = 0: uniform (reversed)
    with pytest.raises(ValueError, match="outside"):
        F.mode_times(u, 2.0)


def test_loss_weights_equal_diffusers():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    t = torch.tensor([0.001, 0.1, 0.5, 0.9, 1.0])
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        ref = compute_loss_weighting_for_sd3(scheme, t.double()).float()
        assert torch.allclose(F.flow_loss_weight(scheme, t), ref, rtol=1e-6, atol=0), scheme
    assert F.flow_loss_weight("sigma_sqrt", torch.tensor([0.5])).item() == 4.0
    assert F.flow_loss_weight("cosmap", torch.tensor([0.5])).item() == pytest.approx(4 / math.pi)


def test_model_shift_from_the_scheduler_config():
    assert F.model_shift(SD3_SCHEDULER) == 3.0 and F.model_shift(None) == 1.0
    with pytest.raises(ValueError, match="dynamic shifting"):
        F.model_shift({"use_dynamic_shifting": True})


def _objective(noise=None, loss=None, scheduler=SD3_SCHEDULER):
    return Objective(noise or NoiseConfig(), loss or LossConfig(), "flow", native_resolution=1024,
                     scheduler_config=scheduler)


def test_objective_applies_the_models_shift():
    g = torch.Generator().manual_seed(0)
    latents = torch.zeros(20000, 1, 1, 1)
    t = _objective().prepare(latents, g).timesteps.double() / 1000
    # uniform u shifted by 3: t = 3u / (1 + 2u); its median is shift(0.5) = 0.75 (unshifted: 0.5).
    assert t.median().item() == pytest.approx(0.75, abs=0.01)
    # timestep_shift (sd-scripts' training_shift) multiplies on top: 3 * 2 = 6 -> median 6*0.5/(1+5*0.5) = 0.857.
    t6 = _objective(NoiseConfig(timestep_shift=2.0)).prepare(latents, torch.Generator().manual_seed(0)).timesteps
    assert (t6.double() / 1000).median().item() == pytest.approx(6 * 0.5 / 3.5, abs=0.01)
    # without a scheduler config (the old flow path) nothing changes: median 0.5
    t1 = _objective(scheduler=None).prepare(latents, torch.Generator().manual_seed(0)).timesteps
    assert (t1.double() / 1000).median().item() == pytest.approx(0.5, abs=0.01)


def test_objective_mode_sampling_and_resolution_shift():
    latents = torch.zeros(20000, 1, 1, 1)
    noise = NoiseConfig(timestep_sampling="mode", mode_scale=1.29)
    t = _objective(noise, scheduler=None).prepare(latents, torch.Generator().manual_seed(1)).timesteps.double() / 1000
    # f_mode maps the uniform median 0.5 to 0.5 and is symmetric: median 0.5, but fewer samples near the ends
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    assert (t < 0.1).float().mean().item() < 0.06  # uniform: 0.10
    # resolution shift: a 128 x 128 latent (1024 px) at native 1024 is a = 1; at 512 px native it is a = 2.
    obj = Objective(NoiseConfig(resolution_shift=True), LossConfig(), "flow", native_resolution=512,
                    scheduler_config=SD3_SCHEDULER)
    assert obj.shift_for(torch.zeros(1, 16, 128, 128)) == pytest.approx(6.0)


def test_objective_flow_weighting_reaches_the_loss():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 16, 4, 4, generator=g)
    obj = _objective(loss=LossConfig(flow_weighting="cosmap"))
    prepared = obj.prepare(latents, torch.Generator().manual_seed(2))
    pred = torch.zeros_like(latents)
    _, per_sample = obj.loss(pred, prepared)
    t = prepared.timesteps.float() / 1000
    mse = (prepared.target.float() ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(per_sample, mse * 2 / (math.pi * (1 - 2 * t + 2 * t**2)), rtol=1e-5)
    _, plain = _objective().loss(pred, prepared)
    assert torch.allclose(plain, mse, rtol=1e-6)


def test_options_that_do_not_apply_fail_clearly():
    with pytest.raises(ConfigError, match="zero_terminal_snr rescales DDPM betas"):
        check_prediction_compat(NoiseConfig(zero_terminal_snr=True), "flow", LossConfig())
    with pytest.raises(ConfigError, match="'mode' is SD3's rectified-flow density"):
        check_prediction_compat(NoiseConfig(timestep_sampling="mode"), "epsilon", LossConfig())
    with pytest.raises(ConfigError, match="loss.flow_weighting = 'cosmap' is for rectified-flow models"):
        check_prediction_compat(NoiseConfig(), "v_prediction", LossConfig(flow_weighting="cosmap"))
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        check_prediction_compat(NoiseConfig(), "flow", LossConfig(min_snr_gamma=5.0))
    with pytest.raises(ConfigError, match="noise.mode_scale = 2.0"):
        NoiseConfig(mode_scale=2.0).validate()
