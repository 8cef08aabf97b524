"""Generation for any MfM task: condition from a task builder, guided Euler, decode to pixels.

Under tensor and context parallelism every rank runs the same Euler loop on the full latent:
the model splits the tokens itself, and under CP its head returns this rank's tokens, which are
gathered here so every rank holds the whole velocity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mfm.encoders.interface import FrozenEncoders
from megatron_mfm.diffusion.sampler import euler_sample, sigma_schedule
from megatron_mfm.model.geometry import latent_shape
from megatron_mfm.tasks.builders import Clip, TaskSample, build_task_sample

# The official inference script's negative prompt (infer_mfm_pipeline.py --negative_prompt).
OFFICIAL_NEGATIVE_PROMPT = (
    "static, watermark, subtitles, scene change, flickering, distorted, discontinuous, bad anatomy, bad hands, "
    "missing fingers, cropped, ugly, blurry, low resolution, low quality, motionless, cartoon, animation, "
    "oil painting, #reverse, #motion: super-fast, #backplay, human distortion, unnatural movement"
)


@dataclass
class SamplingConfig:
    steps: int = 30
    """Euler steps (the official scripts/inference.sh uses 30)."""
    guidance_scale: float = 9.0
    """Classifier-free guidance (the official scripts/inference.sh uses 9)."""
    schedule: str = "official"
    """official (MfM time warp) or shifted."""
    shift: float = 3.0
    """Shift of the ``shifted`` schedule."""
    negative_prompt: str = ""
    seed: int = 0


@torch.no_grad()
def generate(model: torch.nn.Module, encoders: FrozenEncoders, sample: TaskSample, config: SamplingConfig,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sample a clip (3, F, H, W) in [-1, 1] for one task sample (its condition and prompt).

    The unconditional branch gets the negative prompt and the same condition with zero depth,
    as the official pipeline does.
    """
    device = next(model.parameters()).device
    frames, height, width = sample.pixels.shape[1:]
    shape = latent_shape(frames, height, width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))[None].to(device)
    text_c, mask_c = encoders.encode_text([sample.prompt], device)
    text_u, mask_u = encoders.encode_text([config.negative_prompt], device)
    condition = encoders.with_estimated_depth(sample.condition.to(device), sample.pixels.to(device),
                                              sample.depth_to_estimate)[None].to(dtype)
    uncond_condition = condition.clone()
    uncond_condition[:, 3] = 0
    motion = torch.tensor([sample.motion_score], device=device)

    def velocity(x: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
        text, mask, cond = (text_c, mask_c, condition) if conditional else (text_u, mask_u, uncond_condition)
        return model(x.to(dtype), t, text.to(dtype), mask, cond, motion)

    sigmas = sigma_schedule(config.steps, config.schedule, config.shift)
    latents = euler_sample(velocity, noise, sigmas, config.guidance_scale)
    return encoders.decode_video(latents)[0]


def task_sample_for(clip: Clip, task: str, seed: int = 0) -> TaskSample:
    """The condition and prompt of ``task`` built from a reference clip (no dropout)."""
    return build_task_sample(clip, task, torch.Generator().manual_seed(seed))
