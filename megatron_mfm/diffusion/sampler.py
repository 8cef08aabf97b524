"""Euler sampling over a flow-matching sigma schedule with classifier-free guidance.

Schedules:
- ``FlowMatchScheduler``: the official pipeline's (diffusers ``FlowMatchEulerDiscreteScheduler``
  read from a pipeline's ``scheduler/scheduler_config.json``): at the official script's default,
  sigmas shift(linspace(1, shift(1/1000), N)); with ``warp`` (the script's ``--use_t_schedule``)
  the MfM time warp below, shifted once more by the scheduler's shift. Computed in the scheduler's
  float32/float64 steps, so the model sees the same timesteps.
- ``sigma_schedule`` (training previews): ``official`` (the warp alone) or ``shifted`` (linear
  sigmas with the SD3 shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from megatron_mfm.diffusion.flow_matching import shift_sigma

# velocity(x_t, timestep (B,), conditional: bool) -> v
VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]

# scheduler_config.json fields whose non-default values this sampler does not reproduce.
UNSUPPORTED_SCHEDULER_OPTIONS = {
    "use_dynamic_shifting": False, "shift_terminal": None, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False,
}


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


@dataclass
class FlowMatchScheduler:
    """The flow-matching Euler scheduler of an official pipeline folder."""

    shift: float = 1.0
    num_train_timesteps: int = 1000

    @classmethod
    def from_config(cls, config: dict, source: str) -> FlowMatchScheduler:
        """From a ``scheduler_config.json`` dict; options it cannot reproduce are refused by name."""
        name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{source}: scheduler {name} is not supported (only FlowMatchEulerDiscreteScheduler)")
        for option, default in UNSUPPORTED_SCHEDULER_OPTIONS.items():
            if config.get(option, default) not in (default, 0):
                raise ValueError(f"{source}: {option}={config[option]!r} is not supported (only {default!r})")
        return cls(shift=float(config.get("shift", 1.0)), num_train_timesteps=int(config.get("num_train_timesteps", 1000)))

    def _shifted(self, sigmas):
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def schedule(self, num_steps: int, warp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (num_steps + 1,) ending at 0, model timesteps (num_steps,)), float32."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be at least 1")
        if warp:
            sigmas = self._shifted(official_time_warp(num_steps).numpy())
        else:
            steps = self.num_train_timesteps
            trained = torch.linspace(1, steps, steps, dtype=torch.float32).flip(0) / steps
            lowest = self._shifted(trained)[-1].item()
            sigmas = self._shifted(np.linspace(steps, lowest * steps, num_steps) / steps)
        sigmas = torch.from_numpy(np.asarray(sigmas)).float()
        return torch.cat([sigmas, sigmas.new_zeros(1)]), sigmas * self.num_train_timesteps


def euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float = 1.0,
    timesteps: torch.Tensor | None = None,
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigma=sigmas[0] (pure noise) to sigmas[-1]=0.

    The model's timestep is ``timesteps[i]`` (default sigma * 1000, float32). With guidance_scale
    > 1 the velocity is u + s * (c - u) from the unconditional and conditional predictions (the
    official guidance; at <= 1 only the conditional branch runs, as there). Each step is taken in
    float32 and the latents kept in the noise's dtype (bf16 latents are rounded every step).
    """
    sigmas = sigmas.float()
    timesteps = sigmas[:-1] * 1000.0 if timesteps is None else timesteps.float()
    x = noise
    with torch.no_grad():
        for index, t in enumerate(timesteps):
            t = t.expand(x.shape[0]).to(x.device)
            v = velocity(x, t, True).float()
            if guidance_scale > 1.0:
                u = velocity(x, t, False).float()
                v = u + guidance_scale * (v - u)
            x = (x.float() + (sigmas[index + 1] - sigmas[index]).to(x.device) * v).to(noise.dtype)
            if progress is not None:
                progress()
    return x
