"""The CogVideoX VAE as MfM uses it: scaled latents of 4k+1-frame clips, and back.

Facts from the official code (leeruibin/MfM, inference only): its one VAE encoding (the
latent-concat condition path of ``mfm/pipelines/pipeline_mfm_copy.py``) samples the posterior and
multiplies by the latent scale, ``vae.encode(x).latent_dist.sample().mul_(vae_scaling_factor)``;
decoding divides by 0.958917567 and uses tiling (``mfm/pipelines/pipeline_mfm.py``). Layout is
diffusers' (B, C, F, H, W).
"""

from __future__ import annotations

import torch

TIME_STRIDE, SPACE_STRIDE = 4, 8


class CogVideoXCodec:
    """Pixels (B, 3, F, H, W) in [-1, 1] <-> latents (B, 16, (F-1)/4+1, H/8, W/8) * scaling_factor."""

    def __init__(self, vae: torch.nn.Module, scaling_factor: float, sample_posterior: bool = True,
                 tiling: bool = False, slicing: bool = False):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = scaling_factor
        self.sample_posterior = sample_posterior
        if tiling:
            self.vae.enable_tiling()
        if slicing:
            self.vae.enable_slicing()

    @property
    def _parameter(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
               ) -> torch.Tensor:
        """Float32 latents; ``generator`` (one, or one per clip) makes posterior samples repeatable."""
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}: expected (B, 3, F, H, W)")
        frames, height, width = pixels.shape[2:]
        if (frames - 1) % TIME_STRIDE or height % SPACE_STRIDE or width % SPACE_STRIDE:
            raise ValueError(f"clip of {frames} frames at {height}x{width}: the CogVideoX VAE needs 4k+1 frames "
                             f"and sides divisible by {SPACE_STRIDE}")
        weight = self._parameter
        posterior = self.vae.encode(pixels.to(weight.device, weight.dtype)).latent_dist
        latents = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return latents.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 16, T, h, w) scaled latents -> float32 pixels (B, 3, 4(T-1)+1, 8h, 8w) in [-1, 1]
        (tiled when built with ``tiling``, as the official pipeline always decodes)."""
        weight = self._parameter
        unscaled = (1 / self.scaling_factor) * latents.to(weight.device, weight.dtype)  # as the official decode rounds
        return self.vae.decode(unscaled).sample.float().clamp(-1, 1)
