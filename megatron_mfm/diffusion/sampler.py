"""Euler sampling over a flow-matching sigma schedule with classifier-free guidance.

Schedules: ``shifted`` (linear sigmas with the SD3 shift, as diffusers'
FlowMatchEulerDiscreteScheduler) and ``official`` (the MfM pipeline's time warp: shift 17 for the
first 60% of the steps, then easing linearly to 7).
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_mfm.diffusion.flow_matching import shift_sigma

# velocity(x_t, timestep (B,), conditional: bool) -> v
VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def official_time_warp(num_steps: int, shift_start: float = 17.0, shift_end: float = 7.0) -> torch.Tensor:
    """Sigmas of the official MfM pipeline (``t_schedule``), num_steps values from 1 to 0."""
    linear = torch.linspace(1.0, 0.0, num_steps, dtype=torch.float64)
    pivot = int(num_steps * 0.6)
    shifts = torch.full((num_steps,), shift_start, dtype=torch.float64)
    for n in range(pivot, num_steps):
        ease = 1 - (n - pivot) / (num_steps - pivot)
        shifts[n] = shift_start * ease + shift_end * (1 - ease)
    return (shifts * linear / (1 + (shifts - 1) * linear)).float()


def sigma_schedule(num_steps: int, schedule: str = "official", shift: float = 3.0) -> torch.Tensor:
    """num_steps + 1 decreasing sigmas ending at 0 (the last is the clean sample)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1")
    if schedule == "official":
        sigmas = official_time_warp(num_steps)
    elif schedule == "shifted":
        sigmas = shift_sigma(torch.linspace(1.0, 1.0 / num_steps, num_steps), shift)
    else:
        raise ValueError(f"unknown sigma schedule {schedule!r}; choose official or shifted")
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigma=sigmas[0] (pure noise) to sigmas[-1]=0.

    With guidance_scale != 1 the velocity is u + s * (c - u) from the unconditional and
    conditional predictions (the official guidance).
    """
    x = noise
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((x.shape[0],), float(sigma) * 1000.0, device=x.device, dtype=x.dtype)
        v = velocity(x, t, True).float()
        if guidance_scale != 1.0:
            u = velocity(x, t, False).float()
            v = u + guidance_scale * (v - u)
        x = (x.float() + (float(next_sigma) - float(sigma)) * v).to(noise.dtype)
    return x
