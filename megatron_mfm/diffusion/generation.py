"""Generation for any MfM task: condition from a task builder, guided Euler, decode to pixels.

Under tensor and context parallelism every rank runs the same Euler loop on the full latent:
the model splits the tokens itself and returns the whole velocity on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_mfm.encoders.interface import FrozenEncoders
from megatron_mfm.diffusion.sampler import FlowMatchScheduler, euler_sample, sigma_schedule
from megatron_mfm.model.geometry import latent_shape
from megatron_mfm.tasks.builders import TASK_NAMES, Clip, TaskSample, build_task_sample

# The official inference script's negative prompt (infer_mfm_pipeline.py --negative_prompt).
OFFICIAL_NEGATIVE_PROMPT = (
    "static, watermark, subtitles, scene change, flickering, distorted, discontinuous, bad anatomy, bad hands, "
    "missing fingers, cropped, ugly, blurry, low resolution, low quality, motionless, cartoon, animation, "
    "oil painting, #reverse, #motion: super-fast, #backplay, human distortion, unnatural movement"
)
SCHEDULES = ("scheduler", "warp", "official", "shifted")


@dataclass(frozen=True)
class OfficialTaskDefaults:
    """What the official script (infer_mfm_pipeline.py) uses for a task unless told otherwise."""

    prompt_suffix: str | None = None
    """Words between the caption and the task tag; None: the ``#FPS: <fps>.`` tag."""
    negative_prompt: str = OFFICIAL_NEGATIVE_PROMPT
    guidance_scale: float = 6.0
    size: tuple[int, int] = (352, 640)
    """(height, width) of the canvas."""


_COLOUR = OfficialTaskDefaults("natural, vibrant", "over-saturated, grayscale, b&w, color bleeding, plain", 7.0)
_SUPER_RESOLUTION = OfficialTaskDefaults(
    "clean, extremely detailed, high-resolution, 4k",
    "blurry, dotted, noise, jpeg compression, raster lines, unclear, lowres, over-smoothed")
OFFICIAL_TASK_DEFAULTS = {
    **{task: OfficialTaskDefaults() for task in TASK_NAMES},
    "t2i": OfficialTaskDefaults(size=(1024, 1024)),
    "icolor": OfficialTaskDefaults(**{**_COLOUR.__dict__, "size": (1024, 1024)}),
    "vcolor": _COLOUR,
    "isr": OfficialTaskDefaults(**{**_SUPER_RESOLUTION.__dict__, "size": (1280, 1280)}),
    "vsr": _SUPER_RESOLUTION,
}


def official_prompt(caption: str, task: str, fps: float = 16.0) -> str:
    """The text the official script encodes: caption, the task's suffix, the task tag."""
    suffix = OFFICIAL_TASK_DEFAULTS[task].prompt_suffix
    return f"{caption} {f'#FPS: {round(fps)}.' if suffix is None else suffix} #task: {TASK_NAMES[task]}"


@dataclass
class SamplingConfig:
    steps: int = 30
    """Euler steps (the official scripts/inference.sh uses 30, infer_mfm_pipeline.py 25)."""
    guidance_scale: float = 9.0
    """Classifier-free guidance, used when > 1 (scripts/inference.sh: 9, infer_mfm_pipeline.py: 6)."""
    schedule: str = "official"
    """scheduler (the official default: a pipeline's flow-matching scheduler), warp (its
    --use_t_schedule: the MfM time warp, then the scheduler's shift), official (the warp alone) or
    shifted (linear sigmas with the shift)."""
    shift: float = 3.0
    """Shift of the scheduler, warp and shifted schedules."""
    negative_prompt: str = ""
    seed: int = 0
    """Noise seed when ``generate`` gets no generator."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown sigma schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def sigmas_and_timesteps(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.schedule in ("scheduler", "warp"):
            return FlowMatchScheduler(self.shift).schedule(self.steps, warp=self.schedule == "warp")
        sigmas = sigma_schedule(self.steps, self.schedule, self.shift)
        return sigmas, sigmas[:-1] * 1000.0


@torch.no_grad()
def generate(model: torch.nn.Module, encoders: FrozenEncoders, sample: TaskSample, config: SamplingConfig,
             dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
             progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Sample a clip (3, F, H, W) in [-1, 1] for one task sample (its condition and prompt).

    The noise is drawn in ``dtype`` on the model's device from ``generator`` (default: one seeded
    with ``config.seed`` there), as the official pipeline draws it. The unconditional branch gets
    the negative prompt and the same condition with zero depth, as the official pipeline does.
    ``progress`` is called after every step.
    """
    device = next(model.parameters()).device
    generator = generator or torch.Generator(device).manual_seed(config.seed)
    noise = torch.randn((1, *latent_shape(*sample.pixels.shape[1:])), generator=generator, device=device, dtype=dtype)
    return _guided_sample(model, encoders, [sample], noise, config, progress)[0]


@torch.no_grad()
def generate_batch(model: torch.nn.Module, encoders: FrozenEncoders, samples: list[TaskSample],
                   config: SamplingConfig, seeds: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``generate`` for task samples of one shape at once, (B, 3, F, H, W): sample ``i``'s noise is
    the one ``generate`` draws with ``config.seed = seeds[i]``, so each row is that sample's clip
    (up to the rounding of a batched forward)."""
    device = next(model.parameters()).device
    shape = (1, *latent_shape(*samples[0].pixels.shape[1:]))
    noise = torch.cat([torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device,
                                   dtype=dtype) for seed in seeds])
    return _guided_sample(model, encoders, samples, noise, config)


def _guided_sample(model: torch.nn.Module, encoders: FrozenEncoders, samples: list[TaskSample],
                   noise: torch.Tensor, config: SamplingConfig,
                   progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Guided Euler from ``noise`` (B, ...) in its dtype for ``samples``, decoded: (B, 3, F, H, W)."""
    device, dtype = noise.device, noise.dtype
    text_c, mask_c = encoders.encode_text([sample.prompt for sample in samples], device)
    text_u, mask_u = encoders.encode_text([config.negative_prompt] * len(samples), device)
    condition = torch.stack([
        encoders.with_estimated_depth(s.condition.to(device), s.pixels.to(device), s.depth_to_estimate)
        for s in samples]).to(dtype)
    uncond_condition = condition.clone()
    uncond_condition[:, 3] = 0
    motion = torch.tensor([sample.motion_score for sample in samples], device=device)

    def velocity(x: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
        text, mask, cond = (text_c, mask_c, condition) if conditional else (text_u, mask_u, uncond_condition)
        return model(x.to(dtype), t, text.to(dtype), mask, cond, motion)

    sigmas, timesteps = config.sigmas_and_timesteps()
    latents = euler_sample(velocity, noise, sigmas, config.guidance_scale, timesteps, progress)
    return encoders.decode_video(latents)


def task_sample_for(clip: Clip, task: str, seed: int = 0) -> TaskSample:
    """The condition and prompt of ``task`` built from a reference clip (no dropout)."""
    return build_task_sample(clip, task, torch.Generator().manual_seed(seed))
