"""Rectified-flow training objective of MfM.

x_t = (1 - sigma) * x0 + sigma * noise, the model predicts the velocity v = noise - x0, and the
model's timestep input is sigma * 1000 (as the official pipeline feeds it).

sigma per sample: logit-normal (SD3) or uniform, then a resolution shift
sigma' = s*sigma / (1 + (s-1)*sigma) whose s grows with the token count (log-linear between two
anchors, as Flux/SD3 do): larger clips keep more of their training signal at high noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class FlowMatchingConfig:
    """How training timesteps are drawn."""

    distribution: str = "logit_normal"
    """``logit_normal`` or ``uniform``."""

    logit_mean: float = 0.0
    """Mean of the normal before the sigmoid."""

    logit_std: float = 1.0
    """Std of the normal before the sigmoid."""

    shift_base: float = 1.0
    """Shift at ``tokens_base`` tokens (1 = no shift)."""

    shift_max: float = 3.0
    """Shift at ``tokens_max`` tokens (log-linear in between, clamped outside)."""

    tokens_base: int = 1024
    """Token count of the smallest training resolution (e.g. a 256x256 image: 1024 tokens)."""

    tokens_max: int = 22000
    """Token count of the largest (97 x 352 x 640: 22,000 tokens)."""

    def __post_init__(self) -> None:
        if self.distribution not in ("logit_normal", "uniform"):
            raise ValueError(f"flow_matching.distribution={self.distribution!r}: use logit_normal or uniform")
        if self.logit_std <= 0:
            raise ValueError(f"flow_matching.logit_std={self.logit_std} must be positive")
        if self.shift_base <= 0 or self.shift_max <= 0:
            raise ValueError("flow_matching.shift_base and shift_max must be positive")
        if not 0 < self.tokens_base <= self.tokens_max:
            raise ValueError("flow_matching.tokens_base must be positive and <= tokens_max")


def resolution_shift(config: FlowMatchingConfig, num_tokens: int) -> float:
    """The shift for a clip of ``num_tokens`` tokens."""
    if config.tokens_max == config.tokens_base:
        return config.shift_max
    frac = (math.log(num_tokens) - math.log(config.tokens_base)) / (
        math.log(config.tokens_max) - math.log(config.tokens_base)
    )
    frac = min(max(frac, 0.0), 1.0)
    return math.exp((1 - frac) * math.log(config.shift_base) + frac * math.log(config.shift_max))


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 time shift: more weight on high noise for shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_of_draw(config: FlowMatchingConfig, draw: float, shift: float) -> float:
    """One noise level, in float64, from its raw draw: a standard normal for ``logit_normal``, a
    uniform in [0, 1) for ``uniform``."""
    if config.distribution == "uniform":
        sigma = draw
    else:
        sigma = 1.0 / (1.0 + math.exp(-(draw * config.logit_std + config.logit_mean)))
    return shift_sigma(sigma, shift)


def sample_sigmas(config: FlowMatchingConfig, num_tokens: int, generators: list[torch.Generator]) -> torch.Tensor:
    """(len(generators),) float32 noise levels for clips of ``num_tokens`` tokens, the i-th from
    ``generators[i]`` alone: one draw (one torch op) per sample and its math in Python float64, so
    a sample's level is the same whatever batch it is in (a batched float32 sigmoid rounds by
    position) and the host cost stays small."""
    draws = torch.empty(len(generators), dtype=torch.float64)
    for slot, generator in zip(draws.unbind(), generators):
        if config.distribution == "uniform":
            slot.uniform_(generator=generator)
        else:
            slot.normal_(generator=generator)
    shift = resolution_shift(config, num_tokens)
    return torch.tensor([sigma_of_draw(config, draw, shift) for draw in draws.tolist()], dtype=torch.float32)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for clean latents x0 (B, ...) and per-sample sigma (B,)."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample over all its latent elements, in fp32: (B,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
