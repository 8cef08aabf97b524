"""Input degradations for super-resolution and colorization (pixels in [-1, 1], (3, F, H, W))."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R 601 luma, as torchvision's rgb_to_grayscale (used by the official pipeline).
LUMA = (0.2989, 0.587, 0.114)


def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """Luma replicated to three channels."""
    weights = torch.tensor(LUMA, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1, 1)
    luma = ((pixels * 0.5 + 0.5) * weights).sum(dim=0, keepdim=True)
    return (luma * 2 - 1).expand_as(pixels).clone()


def low_resolution(pixels: torch.Tensor, generator: torch.Generator, min_factor: float = 2.0,
                   max_factor: float = 4.0, noise_std: float = 0.02) -> torch.Tensor:
    """Downscale by a random factor (area), add a little noise, upscale back (bicubic)."""
    _, _, h, w = pixels.shape
    factor = min_factor + (max_factor - min_factor) * torch.rand(1, generator=generator).item()
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    frames = pixels.permute(1, 0, 2, 3)  # (F, 3, H, W)
    low = F.interpolate(frames, size=small, mode="area")
    low = low + noise_std * torch.randn(low.shape, generator=generator)
    up = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return up.clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
