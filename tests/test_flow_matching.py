"""Flow matching: noising, timestep distributions, shift, loss, and the Euler sampler."""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.diffusion.flow_matching import (
    FlowMatchingConfig,
    add_noise,
    per_sample_mse,
    resolution_shift,
    sample_sigmas,
)
from megatron_mfm.diffusion.sampler import euler_sample, official_time_warp, sigma_schedule


def _generators(count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in range(count)]


def test_noising_endpoints_and_target():
    x0, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    xt, v = add_noise(x0, noise, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    assert torch.allclose(xt[2], 0.75 * x0[2] + 0.25 * noise[2])
    assert torch.equal(v, noise - x0)


@pytest.mark.parametrize("distribution", ["logit_normal", "uniform"])
def test_sample_sigmas_follow_the_shifted_distribution(distribution):
    """Mean and std of many samples' levels against the formula's, integrated numerically:
    sigmoid(N(mean, std)) or U(0, 1), then the resolution shift."""
    flow = FlowMatchingConfig(distribution=distribution, logit_mean=0.3, logit_std=0.8, shift_max=3.0)
    tokens = 4000
    shift = resolution_shift(flow, tokens)
    if distribution == "uniform":
        x = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
        weight = torch.full_like(x, 1 / 200_000)
        base = x
    else:
        x = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
        weight = torch.exp(-x**2 / 2) / (2 * torch.pi) ** 0.5 * (x[1] - x[0])
        base = torch.sigmoid(x * 0.8 + 0.3)
    shifted = shift * base / (1 + (shift - 1) * base)
    mean = (shifted * weight).sum()
    std = (((shifted - mean) ** 2 * weight).sum()) ** 0.5
    sigma = sample_sigmas(flow, tokens, _generators(20_000)).double()
    assert 0 < sigma.min() and sigma.max() < 1
    assert abs(sigma.mean() - mean) < 0.005 and abs(sigma.std() - std) < 0.005, (sigma.mean(), mean, sigma.std(), std)


def test_shift_grows_with_tokens():
    config = FlowMatchingConfig(shift_base=1.0, shift_max=3.0, tokens_base=1024, tokens_max=22000)
    assert resolution_shift(config, 512) == pytest.approx(1.0)
    assert resolution_shift(config, 22000) == pytest.approx(3.0)
    assert resolution_shift(config, 90000) == pytest.approx(3.0)
    mid = resolution_shift(config, int((1024 * 22000) ** 0.5))
    assert mid == pytest.approx(3.0**0.5, rel=1e-3)  # log-linear: geometric midpoint
    large, small = (sample_sigmas(config, tokens, _generators(4000)) for tokens in (22000, 1024))
    assert large.mean() > small.mean() + 0.1


def test_bad_flow_config_names_the_field():
    with pytest.raises(ValueError, match="distribution"):
        FlowMatchingConfig(distribution="beta")
    with pytest.raises(ValueError, match="logit_std"):
        FlowMatchingConfig(logit_std=0)


def test_per_sample_mse_is_a_mean_per_sample():
    pred = torch.zeros(2, 3, 4)
    target = torch.stack([torch.ones(3, 4), 2 * torch.ones(3, 4)])
    assert torch.equal(per_sample_mse(pred, target), torch.tensor([1.0, 4.0]))


def test_official_time_warp_by_hand():
    # 5 steps: linear 1, .75, .5, .25, 0; pivot 3; shifts 17, 17, 17, 17, 12.
    expected = [1.0, 17 * 0.75 / (1 + 16 * 0.75), 17 * 0.5 / (1 + 16 * 0.5), 17 * 0.25 / (1 + 16 * 0.25), 0.0]
    assert torch.allclose(official_time_warp(5), torch.tensor(expected))
    sigmas = sigma_schedule(30)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas[:-1] >= sigmas[1:]).all()


def test_euler_recovers_the_target_of_an_exact_velocity():
    """For one target x0 the exact flow is v(x, sigma) = (x - x0) / sigma; Euler is exact."""
    x0 = torch.randn(2, 3)

    def velocity(x, t, conditional):
        return (x - x0) / (t / 1000).view(-1, 1)

    out = euler_sample(velocity, torch.randn(2, 3), sigma_schedule(7, "shifted", 3.0))
    assert torch.allclose(out, x0, atol=1e-5)


def test_guidance_extrapolates_from_unconditional():
    a, b = torch.randn(1, 3), torch.randn(1, 3)
    noise = torch.randn(1, 3)
    sigmas = torch.tensor([1.0, 0.0])
    out = euler_sample(lambda x, t, c: a if c else b, noise, sigmas, guidance_scale=4.0)
    assert torch.allclose(out, noise - (b + 4.0 * (a - b)))
