"""The resolution shift at the top of the DDPM range (issue 21 item 5): the shifted distribution is truncated to what
the table represents and renormalised (library/diffusion/schedule.py, sample_ddpm_timesteps), not piled on t = 999."""

from __future__ import annotations

import math

import pytest
import torch

from library.diffusion import schedule as S

SIGMAS = S.sigmas_from_alphas_cumprod(S.alphas_cumprod_from_betas(S.make_betas()))
ZT_SIGMAS = S.sigmas_from_alphas_cumprod(S.alphas_cumprod_from_config({}, zero_terminal_snr=True))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shift_source_range_exact():
    assert S.shift_source_range(SIGMAS, 1.0, 0, 1000) == (0, 1000)
    # Shift 2: sources 875..999 would need sigma above the table's top cell (14.61 * half a gap); 0..874 fit.
    assert S.shift_source_range(SIGMAS, 2.0, 0, 1000) == (0, 875)
    assert 2 * SIGMAS[874] < SIGMAS[999] * math.sqrt(SIGMAS[999] / SIGMAS[998]) < 2 * SIGMAS[875]
    assert S.shift_source_range(SIGMAS, 0.5, 0, 1000) == (2, 1000)  # below sigma_min the same rule cuts the bottom
    assert S.shift_source_range(ZT_SIGMAS, 2.0, 0, 1000) == (0, 1000)  # zero terminal SNR: sigma_max is inf already
    assert S.shift_source_range(SIGMAS, 2.0, 999, 1000) == (999, 999)  # nothing fits


def test_shift_2_gives_the_last_step_only_its_own_cell():
    t = S.sample_ddpm_timesteps(200_000, gen(0), SIGMAS, shift=2.0)
    # The rule: sources uniform on 0..874, each snapped to the nearest log sigma; one of them lands on 999.
    rule = torch.bincount(S.shift_ddpm_timesteps(torch.arange(875), SIGMAS, 2.0), minlength=1000).double() / 875
    assert rule[999].item() == 1 / 875
    share = (t == 999).double().mean().item()
    assert abs(share - 1 / 875) < 4 * math.sqrt(1 / 875 / 200_000)  # was 0.127 (every source above 874 clamped)
    # The whole histogram matches the rule, in ten bands of 100 steps (4 binomial sigmas each).
    seen = torch.bincount(t, minlength=1000).double().view(10, 100).sum(1) / len(t)
    expected = rule.view(10, 100).sum(1)
    assert bool(((seen - expected).abs() <= 4 * (expected * (1 - expected) / len(t)).sqrt() + 1e-12).all())
    assert t.min().item() == 3 and t.max().item() == 999  # 0..2 are below sigma_0 * 2's cell: never drawn


def test_shift_exact_values_for_fixed_seeds():
    t = S.sample_ddpm_timesteps(8, gen(0), SIGMAS, shift=2.0)
    # Uniform: u ~ U[0, 0.875), source floor(1000 u), then the nearest log-sigma snap.
    source = (torch.rand(8, generator=gen(0), dtype=torch.float64) * 0.875 * 1000).floor().long()
    assert torch.equal(t, S.shift_ddpm_timesteps(source, SIGMAS, 2.0))
    assert t.tolist() == [977, 790, 606, 942, 746, 850, 335, 516]
    ln = S.sample_ddpm_timesteps(8, gen(0), SIGMAS, shift=2.0, sampling="logit_normal")
    assert ln.tolist() == [934, 623, 247, 795, 453, 388, 765, 841]
    # Shift 1 is unchanged: sd-scripts' randint(min, max) drawn as floor(u * span) + min.
    plain = S.sample_ddpm_timesteps(8, gen(0), SIGMAS, min_timestep=100, max_timestep=900)
    u = torch.rand(8, generator=gen(0), dtype=torch.float64)
    assert torch.equal(plain, (u * 800).floor().long() + 100)


def test_nothing_representable_takes_the_end_step_and_advances_the_generator_once():
    g = gen(3)
    t = S.sample_ddpm_timesteps(5, g, SIGMAS, min_timestep=999, max_timestep=1000, shift=2.0)
    assert t.tolist() == [999] * 5
    after = torch.rand(1, generator=g)
    g2 = gen(3)
    torch.rand(5, generator=g2, dtype=torch.float64)
    assert torch.equal(after, torch.rand(1, generator=g2))


def test_zero_terminal_snr_is_not_truncated():
    a = S.sample_ddpm_timesteps(1000, gen(1), ZT_SIGMAS, shift=2.0)
    source = (torch.rand(1000, generator=gen(1), dtype=torch.float64) * 1000).floor().long()
    assert torch.equal(a, S.shift_ddpm_timesteps(source, ZT_SIGMAS, 2.0))


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1.0, 0.5)])
def test_logit_normal_conditioned_on_a_range(mean, std):
    low, high = 0.2, 0.875
    u = S.sample_unit_times(100_000, gen(2), sampling="logit_normal", logit_mean=mean, logit_std=std, low=low,
                            high=high)
    assert low <= u.min().item() and u.max().item() < high

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf((math.log(x / (1 - x)) - mean) / std / math.sqrt(2)))

    for q in (0.3, 0.5, 0.7, 0.8):
        expected = (cdf(q) - cdf(low)) / (cdf(high) - cdf(low))
        assert abs((u < q).double().mean().item() - expected) < 0.006
    # The whole range is the plain draw, bit for bit.
    whole = S.sample_unit_times(16, gen(2), sampling="logit_normal", logit_mean=mean, logit_std=std)
    plain = torch.sigmoid(torch.randn(16, generator=gen(2), dtype=torch.float64) * std + mean)
    assert torch.equal(whole, plain)
