"""Exact-value tests of library/diffusion (schedule, noise, loss, objective) and library/config/diffusion."""

import math

import pytest
import torch

from library.config.diffusion import LossConfig, NoiseConfig, check_prediction_compat
from library.diffusion import loss as L
from library.diffusion import schedule as S
from library.diffusion.noise import add_flow_noise, add_noise, make_noise, offset_noise, pyramid_noise
from library.diffusion.objective import Objective
from library.errors import ConfigError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- schedule


def test_sd_alphas_cumprod_exact():
    abar = S.alphas_cumprod_from_betas(S.make_betas())
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert abar[0].item() == pytest.approx(1 - 0.00085, abs=1e-15)
    # Independent product of (1 - beta_i), beta_i = (sqrt(b0) + i (sqrt(b1) - sqrt(b0)) / 999)^2.
    r0, r1 = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    for i in range(1000):
        prod *= 1 - (r0 + i * (r1 - r0) / 999) ** 2
    assert abar[999].item() == pytest.approx(prod, rel=1e-12)
    assert abar[999].item() == pytest.approx(0.0046600985, rel=1e-8)
    # sigma_max of SD, the 14.6 that k-diffusion / A1111 / the NovelAI report quote.
    assert S.sigmas_from_alphas_cumprod(abar)[999].item() == pytest.approx(14.6146, abs=1e-4)
    assert S.snr_from_alphas_cumprod(abar)[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-12)


def test_linear_betas_endpoints():
    betas = S.make_betas(10, 0.1, 0.2, "linear")
    assert betas[0].item() == pytest.approx(0.1) and betas[-1].item() == pytest.approx(0.2)
    assert betas[1].item() == pytest.approx(0.1 + 0.1 / 9)
    with pytest.raises(ValueError):
        S.make_betas(10, 0.1, 0.2, "cosine")


def test_matches_diffusers_ddpm_scheduler():
    from diffusers import DDPMScheduler

    ours = S.alphas_cumprod_from_betas(S.make_betas())
    theirs = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(ours.float(), theirs, rtol=1e-5, atol=1e-6)
    ztsnr = S.alphas_cumprod_from_config({"rescale_betas_zero_snr": True})
    theirs = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    ).alphas_cumprod
    assert torch.allclose(ztsnr.float(), theirs, rtol=1e-5, atol=1e-6)


def test_zero_terminal_snr_rescale():
    betas = S.make_betas()
    before = S.alphas_cumprod_from_betas(betas)
    after = S.alphas_cumprod_from_betas(S.rescale_zero_terminal_snr(betas))
    assert after[-1].item() == 0.0
    assert S.snr_from_alphas_cumprod(after)[-1].item() == 0.0
    assert torch.isinf(S.sigmas_from_alphas_cumprod(after)[-1])
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-12)
    assert bool((after[1:] < after[:-1]).all())
    # Algorithm 1: sqrt(abar) is an affine map of the old sqrt(abar): (s - s_T) * s_0 / (s_0 - s_T).
    s = before.sqrt()
    expected = (s - s[-1]) * s[0] / (s[0] - s[-1])
    assert torch.allclose(after.sqrt(), expected, atol=1e-12)


def test_sample_unit_times_and_ddpm_timesteps():
    u = S.sample_unit_times(10000, gen(), sampling="uniform")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = S.sample_unit_times(10000, gen(), sampling="logit_normal", logit_mean=1.0, logit_std=0.5)
    assert ln.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    sigmas = S.sigmas_from_alphas_cumprod(S.alphas_cumprod_from_betas(S.make_betas()))
    t = S.sample_ddpm_timesteps(5000, gen(1), sigmas, min_timestep=100, max_timestep=110)
    assert t.dtype == torch.long and set(t.tolist()) == set(range(100, 110))
    again = S.sample_ddpm_timesteps(5000, gen(1), sigmas, min_timestep=100, max_timestep=110)
    assert torch.equal(t, again)


def test_resolution_shift_factor():
    assert S.resolution_shift(1024, 1024, 512) == 2.0
    assert S.resolution_shift(512, 512, 512) == 1.0
    assert S.resolution_shift(2048, 512, 1024) == 1.0  # same area as the native square
    assert S.resolution_shift(256, 256, 512) == 0.5


def test_shift_ddpm_timesteps_nearest_log_sigma():
    sigmas = S.sigmas_from_alphas_cumprod(S.alphas_cumprod_from_betas(S.make_betas()))
    t = torch.arange(0, 1000, 37)
    assert torch.equal(S.shift_ddpm_timesteps(t, sigmas, 1.0), t)
    shifted = S.shift_ddpm_timesteps(t, sigmas, 2.0)
    log_target = sigmas[t].log() + math.log(2)
    for i in range(len(t)):
        if log_target[i] > sigmas[-1].log():
            assert shifted[i].item() == 999  # saturates at the last timestep
        else:
            nearest = (sigmas.log() - log_target[i]).abs().argmin().item()
            assert shifted[i].item() == nearest
    assert bool((shifted >= t).all())
    # With zero terminal SNR the last sigma is inf; the shift still maps to valid indices and keeps 999 at 999.
    zt = S.sigmas_from_alphas_cumprod(S.alphas_cumprod_from_config({}, zero_terminal_snr=True))
    out = S.shift_ddpm_timesteps(torch.tensor([0, 500, 998, 999]), zt, 2.0)
    assert out[-1].item() == 999 and out[-2].item() == 998 and bool((out >= torch.tensor([0, 500, 998, 999])).all())


def test_flow_shift_and_times():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(S.shift_flow_times(t, 1.0), t)
    shifted = S.shift_flow_times(t, 3.0)
    assert shifted[2].item() == pytest.approx(0.75)
    # sigma = t / (1 - t) is multiplied exactly by the shift.
    assert (shifted[1] / (1 - shifted[1])).item() == pytest.approx(3 * 0.25 / 0.75)
    k, tt = S.sample_flow_times(4000, gen(), 1000, sampling="uniform")
    assert k.dtype == torch.long and k.min() >= 1 and k.max() <= 1000
    assert torch.equal(tt, k.double() / 1000)
    k, _ = S.sample_flow_times(2000, gen(), 1000, min_timestep=10, max_timestep=20, sampling="uniform", shift=3.0)
    assert k.min() >= 11 and k.max() <= 20


# ---------------------------------------------------------------- noise


def test_make_noise_plain_is_one_gaussian():
    latents = torch.zeros(4, 4, 32, 32)
    inp, tgt = make_noise(latents, gen(3))
    assert inp is tgt or torch.equal(inp, tgt)
    assert torch.equal(tgt, torch.randn(4, 4, 32, 32, generator=gen(3)))


def test_input_perturbation_leaves_target_untouched():
    latents = torch.zeros(8, 4, 32, 32)
    _, plain = make_noise(latents, gen(5))
    inp, tgt = make_noise(latents, gen(5), input_perturbation=0.1)
    assert torch.equal(tgt, plain)
    diff = inp - tgt
    assert diff.std().item() == pytest.approx(0.1, rel=0.05)
    inp2, tgt2 = make_noise(latents, gen(5), input_perturbation=0.1, input_perturbation_random_strength=True)
    assert torch.equal(tgt2, plain)
    per_sample = (inp2 - tgt2).std(dim=(1, 2, 3))
    assert bool((per_sample < 0.1 * 1.1).all()) and per_sample.std() > 0.005  # U(0,1) strengths differ


def test_offset_noise_exact_draws():
    latents = torch.randn(2, 3, 4, 4, generator=gen(9)) + 2.0
    g = gen(1)
    base = torch.randn(2, 3, 4, 4, generator=g)
    per_channel = torch.randn(2, 3, 1, 1, generator=g)
    _, got = make_noise(latents, gen(1), offset=0.1)
    assert torch.allclose(got, base + 0.1 * per_channel)
    # adaptive: offset + a * |channel mean|, per sample and channel (sd-scripts adaptive_noise_scale)
    _, got = make_noise(latents, gen(1), offset=0.1, adaptive_offset=0.5)
    strength = 0.1 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs()
    assert torch.allclose(got, base + strength * per_channel)
    # random strength: U(0,1) per sample, drawn before the per-channel noise
    g = gen(1)
    base = torch.randn(2, 3, 4, 4, generator=g)
    u = torch.rand(2, 1, 1, 1, generator=g)
    per_channel = torch.randn(2, 3, 1, 1, generator=g)
    _, got = make_noise(latents, gen(1), offset=0.1, offset_random_strength=True)
    assert torch.allclose(got, base + 0.1 * u * per_channel)
    # negative adaptive scale cannot make the offset negative
    out = offset_noise(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 10.0), gen(), offset=0.1, adaptive_offset=-1)
    assert torch.equal(out, torch.zeros(1, 1, 2, 2))


def test_pyramid_noise_statistics():
    noise = torch.randn(4, 4, 64, 64, generator=gen(0))
    out = pyramid_noise(noise, gen(1), iterations=6, discount=0.4)
    assert out.shape == noise.shape
    assert torch.allclose(out.std(dim=(1, 2, 3)), torch.ones(4), atol=1e-5)
    assert torch.equal(out, pyramid_noise(noise, gen(1), iterations=6, discount=0.4))
    # Low frequencies carry more energy than in white noise: 8x8 block means vary more.
    pooled_white = torch.nn.functional.avg_pool2d(noise, 8).var().item()
    pooled_pyr = torch.nn.functional.avg_pool2d(out, 8).var().item()
    assert pooled_white == pytest.approx(1 / 64, rel=0.3)
    assert pooled_pyr > 1.5 * pooled_white  # ~2x with discount 0.4 (level 0 is a second full-size noise)
    _, tgt = make_noise(torch.zeros(2, 4, 16, 16), gen(2), pyramid_iterations=3)
    assert torch.allclose(tgt.std(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)


def test_add_noise_and_flow_noise_formulas():
    x0, eps = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    abar = torch.tensor([0.64, 0.36], dtype=torch.float64)
    noisy = add_noise(x0, eps, torch.tensor([0, 1]), abar)
    assert torch.allclose(noisy[0], torch.full((1, 2, 2), 0.8 * 2 - 0.6))
    assert torch.allclose(noisy[1], torch.full((1, 2, 2), 0.6 * 2 - 0.8))
    flow = add_flow_noise(x0, eps, torch.tensor([0.25, 1.0]))
    assert torch.allclose(flow[0], torch.full((1, 2, 2), 0.75 * 2 - 0.25))
    assert torch.equal(flow[1], eps[1])


# ---------------------------------------------------------------- targets and losses


def test_v_target_formula_and_inverse():
    x0 = torch.randn(3, 4, 8, 8, generator=gen(1))
    eps = torch.randn(3, 4, 8, 8, generator=gen(2))
    abar = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    v = L.v_target(x0, eps, abar)
    a = abar.float().view(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-6)
    # Salimans & Ho: x0 = sqrt(a) x_t - sqrt(1 - a) v
    xt = add_noise(x0, eps, torch.arange(3), abar)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5)


def test_v_target_matches_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, eps = torch.randn(2, 4, 4, 4, generator=gen(1)), torch.randn(2, 4, 4, 4, generator=gen(2))
    t = torch.tensor([10, 900])
    abar = S.alphas_cumprod_from_betas(S.make_betas())
    assert torch.allclose(L.v_target(x0, eps, abar[t]), sched.get_velocity(x0, eps, t), atol=1e-5)
    assert torch.allclose(add_noise(x0, eps, t, abar), sched.add_noise(x0, eps, t), atol=1e-5)


def test_flow_target_is_velocity():
    x0, eps = torch.randn(2, 4, 4, 4, generator=gen(1)), torch.randn(2, 4, 4, 4, generator=gen(2))
    t, h = torch.tensor([0.3, 0.7]), 0.125
    finite_diff = (add_flow_noise(x0, eps, t + h) - add_flow_noise(x0, eps, t)) / h
    assert torch.allclose(L.flow_target(x0, eps), finite_diff, atol=1e-5)


def test_elementwise_losses_exact_and_limits():
    pred, target = torch.full((1, 1, 1, 2), 3.0), torch.zeros(1, 1, 1, 2)
    assert torch.equal(L.elementwise_loss(pred, target, "l2"), torch.full((1, 1, 1, 2), 9.0))
    assert torch.equal(L.elementwise_loss(pred, target, "l1"), torch.full((1, 1, 1, 2), 3.0))
    c = torch.tensor([4.0])  # sqrt(3^2 + 4^2) = 5
    assert L.elementwise_loss(pred, target, "huber", c)[0, 0, 0, 0].item() == pytest.approx(2 * 4 * (5 - 4))
    assert L.elementwise_loss(pred, target, "smooth_l1", c)[0, 0, 0, 0].item() == pytest.approx(2 * (5 - 4))
    d = torch.tensor([[[[0.5, -2.0]]]])
    zero = torch.zeros_like(d)
    small, large = torch.tensor([1e-4]), torch.tensor([1e4])
    # pseudo-Huber: c -> 0 gives 2 c |d|, c -> inf gives d^2 (= l2)
    assert torch.allclose(L.elementwise_loss(d, zero, "huber", small), 2e-4 * d.abs(), rtol=1e-3)
    assert torch.allclose(L.elementwise_loss(d, zero, "huber", large), d * d, rtol=1e-3)
    # smooth_l1: c -> 0 gives 2 |d|, c -> inf gives d^2 / c
    assert torch.allclose(L.elementwise_loss(d, zero, "smooth_l1", small), 2 * d.abs(), rtol=1e-3)
    assert torch.allclose(L.elementwise_loss(d, zero, "smooth_l1", large), d * d / 1e4, rtol=1e-3)
    with pytest.raises(ValueError):
        L.elementwise_loss(d, zero, "huber")


def test_huber_c_schedules():
    t = torch.tensor([0, 500, 1000])
    sig = torch.tensor([0.0, 1.0, float("inf")])
    const = L.huber_c_schedule("constant", timesteps=t, sigmas_t=sig, huber_c=0.1, huber_scale=2.0)
    assert torch.allclose(const, torch.full((3,), 0.2))
    exp = L.huber_c_schedule("exponential", timesteps=t, sigmas_t=sig, huber_c=0.1, huber_scale=2.0)
    assert torch.allclose(exp, torch.tensor([2.0, 2.0 * math.sqrt(0.1), 0.2]))
    snr = L.huber_c_schedule("snr", timesteps=t, sigmas_t=sig, huber_c=0.1)
    assert torch.allclose(snr, torch.tensor([1.0, 0.9 / 4 + 0.1, 0.1]))


def test_min_snr_and_debiased_weights():
    snr = torch.tensor([10.0, 2.0, 0.0])
    assert torch.allclose(L.min_snr_weight(snr[:2], 5.0, "epsilon"), torch.tensor([0.5, 1.0]))
    assert torch.allclose(L.min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([5 / 11, 2 / 3, 0.0]))
    assert L.min_snr_weight(torch.tensor([float("inf")]), 5.0, "epsilon").item() == 0.0
    assert L.min_snr_weight(torch.tensor([0.0]), 5.0, "epsilon").item() == 1.0
    d = L.debiased_weight(torch.tensor([4.0, 2000.0]), "epsilon")
    assert torch.allclose(d, torch.tensor([0.5, 1 / math.sqrt(1000)]))  # clipped at SNR 1000 (kohya PR #889)
    assert torch.allclose(L.debiased_weight(torch.tensor([4.0, 0.0]), "v_prediction"), torch.tensor([0.4, 0.0]))
    with pytest.raises(ValueError):
        L.min_snr_weight(snr, 5.0, "flow")


def test_v_weights_equal_epsilon_weights_on_the_same_prediction():
    # A v error of size e is an epsilon error of size sqrt(abar) e: weighted losses must agree for both forms.
    abar = torch.tensor([0.9, 0.5, 0.1])
    snr = abar / (1 - abar)
    v_err2 = torch.tensor([1.0, 1.0, 1.0])
    eps_err2 = abar * v_err2
    for fn in (lambda s, p: L.min_snr_weight(s, 5.0, p), L.debiased_weight):
        assert torch.allclose(fn(snr, "v_prediction") * v_err2, fn(snr, "epsilon") * eps_err2, rtol=1e-5)


def test_masked_mean():
    loss = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: 0 1 2 3, channel 1: 4 5 6 7
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert L.masked_mean(loss, mask).item() == pytest.approx((0 + 3 + 4 + 7) / 4)
    assert L.masked_mean(loss).item() == pytest.approx(3.5)
    soft = torch.full((1, 1, 2, 2), 0.5)
    assert L.masked_mean(loss, soft).item() == pytest.approx(3.5)
    assert L.masked_mean(loss, torch.zeros(1, 1, 2, 2)).item() == 0.0
    with pytest.raises(ValueError):
        L.masked_mean(loss, torch.ones(1, 2, 2, 2))


def test_per_sample_loss_order():
    pred = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 1.0)])
    target = torch.zeros(2, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    pred[0, 0, 1, :] = 100.0  # outside the mask: must not count
    snr = torch.tensor([10.0, 1.0])
    out = L.per_sample_loss(
        pred, target, mask=mask, snr=snr, min_snr_gamma=5.0, prediction_type="epsilon", weights=torch.tensor([1.0, 3.0])
    )
    assert torch.allclose(out, torch.tensor([4.0 * 0.5 * 1.0, 1.0 * 1.0 * 3.0]))
    with pytest.raises(ValueError):
        L.per_sample_loss(pred, target, debiased_estimation=True)


# ---------------------------------------------------------------- config and objective


def test_ztsnr_needs_v_prediction_message():
    with pytest.raises(ConfigError) as e:
        check_prediction_compat(NoiseConfig(zero_terminal_snr=True), "epsilon")
    assert "noise.zero_terminal_snr" in str(e.value) and "model.prediction_type" in str(e.value)
    check_prediction_compat(NoiseConfig(zero_terminal_snr=True), "v_prediction")
    with pytest.raises(ConfigError, match="loss.min_snr_gamma"):
        check_prediction_compat(NoiseConfig(), "flow", LossConfig(min_snr_gamma=5))
    with pytest.raises(ConfigError, match="model.prediction_type"):
        check_prediction_compat(NoiseConfig(), "sample")
    with pytest.raises(ConfigError, match="rescale_betas_zero_snr"):
        Objective(NoiseConfig(), LossConfig(), "epsilon", native_resolution=512,
                  scheduler_config={"rescale_betas_zero_snr": True})


@pytest.mark.parametrize(
    "cfg, key",
    [
        (NoiseConfig(offset=-1), "noise.offset"),
        (NoiseConfig(adaptive_offset=0.1), "noise.adaptive_offset"),
        (NoiseConfig(pyramid_discount=0), "noise.pyramid_discount"),
        (NoiseConfig(min_timestep=500, max_timestep=500), "noise.min_timestep"),
        (NoiseConfig(timestep_shift=0), "noise.timestep_shift"),
        (LossConfig(huber_c=2.0, loss_type="huber", huber_schedule="exponential"), "loss.huber_c"),
        (LossConfig(min_snr_gamma=0), "loss.min_snr_gamma"),
    ],
)
def test_config_validation_names_the_key(cfg, key):
    NoiseConfig().validate()
    LossConfig().validate()
    with pytest.raises(ConfigError, match=key):
        cfg.validate()


def test_objective_epsilon_and_v():
    latents = torch.randn(4, 4, 8, 8, generator=gen(7))
    for prediction in ("epsilon", "v_prediction"):
        obj = Objective(NoiseConfig(), LossConfig(), prediction, native_resolution=64)
        p = obj.prepare(latents, gen(1))
        g = gen(1)
        noise = torch.randn(4, 4, 8, 8, generator=g)
        t = S.sample_ddpm_timesteps(4, g, obj.sigma_table)
        assert p.timesteps.dtype == torch.long and torch.equal(p.timesteps, t)
        assert torch.allclose(p.noisy_latents, add_noise(latents, noise, t, obj.alphas_cumprod))
        expected = noise if prediction == "epsilon" else L.v_target(latents, noise, obj.alphas_cumprod[t])
        assert torch.allclose(p.target, expected)
        assert torch.allclose(p.snr, obj.snr_table[t].float())
        loss, per_sample = obj.loss(p.target.clone(), p)
        assert loss.item() == 0.0 and per_sample.shape == (4,)
        loss, per_sample = obj.loss(p.target + 1.0, p)
        assert loss.item() == pytest.approx(1.0) and torch.allclose(per_sample, torch.ones(4))


def test_objective_input_perturbation_changes_input_not_target():
    latents = torch.randn(2, 4, 8, 8, generator=gen(7))
    ip = Objective(NoiseConfig(input_perturbation=0.1), LossConfig(), "v_prediction", native_resolution=64)
    # input perturbation draws after the base noise but before the timesteps, so timesteps differ by design:
    p = ip.prepare(latents, gen(3))
    abar = ip.alphas_cumprod[p.timesteps]
    _, target_noise = make_noise(latents, gen(3), input_perturbation=0.1)
    assert torch.allclose(p.target, L.v_target(latents, target_noise, abar))
    assert not torch.allclose(p.noisy_latents, add_noise(latents, target_noise, p.timesteps, ip.alphas_cumprod))
    # exactly: the input is noised with the perturbed noise, the target built from the plain one (flow too)
    input_noise, _ = make_noise(latents, gen(3), input_perturbation=0.1)
    assert torch.equal(p.noisy_latents, add_noise(latents, input_noise, p.timesteps, ip.alphas_cumprod))
    flow = Objective(NoiseConfig(input_perturbation=0.1), LossConfig(), "flow", native_resolution=64)
    p = flow.prepare(latents, gen(3))
    t = p.timesteps.double() / 1000
    assert torch.equal(p.noisy_latents, add_flow_noise(latents, input_noise, t))
    assert torch.equal(p.target, L.flow_target(latents, target_noise))


def test_objective_ztsnr_flow_and_resolution_shift():
    latents = torch.randn(64, 4, 8, 8, generator=gen(7))
    zt = Objective(NoiseConfig(zero_terminal_snr=True, min_timestep=999), LossConfig(min_snr_gamma=5.0),
                   "v_prediction", native_resolution=64)
    p = zt.prepare(latents, gen(1))
    assert bool((p.timesteps == 999).all()) and bool((p.snr == 0).all())
    assert torch.allclose(p.target, -latents, atol=1e-6)  # v at abar = 0 is -x0
    loss, _ = zt.loss(torch.zeros_like(latents), p)
    assert loss.item() == 0.0  # min-SNR weight at SNR 0 for v is 0
    # NovelAI shift: 8x8 latents * 8 = 64 px = native -> no shift; native 32 -> doubled sigmas, larger timesteps.
    base = Objective(NoiseConfig(resolution_shift=True), LossConfig(), "epsilon", native_resolution=64)
    shifted = Objective(NoiseConfig(resolution_shift=True), LossConfig(), "epsilon", native_resolution=32)
    assert base.shift_for(latents) == 1.0 and shifted.shift_for(latents) == 2.0
    t0, t1 = base.prepare(latents, gen(2)).timesteps, shifted.prepare(latents, gen(2)).timesteps
    g = gen(2)
    torch.randn(latents.shape, generator=g)  # the noise is drawn first, then the timesteps
    assert torch.equal(S.sample_ddpm_timesteps(64, g, base.sigma_table, shift=2.0), t1) and bool((t1 > t0).any())
    flow = Objective(NoiseConfig(timestep_sampling="logit_normal"), LossConfig(loss_type="huber"), "flow",
                     native_resolution=64)
    p = flow.prepare(latents, gen(4))
    t = p.timesteps.double() / 1000
    noise = torch.randn(latents.shape, generator=gen(4))
    assert torch.allclose(p.noisy_latents, add_flow_noise(latents, noise, t), atol=1e-6)
    assert torch.allclose(p.target, noise - latents)
    assert torch.allclose(p.snr, ((1 - t) / t).float() ** 2)
    loss, _ = flow.loss(p.target, p)
    assert loss.item() == 0.0
    with pytest.raises(ConfigError, match="noise.max_timestep"):
        Objective(NoiseConfig(max_timestep=2000), LossConfig(), "epsilon", native_resolution=64)
