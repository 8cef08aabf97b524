"""3D rotary position embedding over the (t, h, w) token grid.

The head dim D is split into D/4 temporal, 3D/8 height and 3D/8 width channels (in that order);
rotary pairs are interleaved (2i, 2i+1) as in GPT-J; positions are integers from 0.
"""

from __future__ import annotations

import functools

import torch


def _axis_angles(dim: int, length: int, theta: float) -> torch.Tensor:
    """Angles (length, dim): each frequency repeated for its two interleaved channels."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.repeat_interleave(2, dim=1)


@functools.lru_cache(maxsize=32)
def rope_cos_sin(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T*H*W, head_dim) for tokens in t-major, then h, then w order, cached
    per device so a training step does not copy them from the host."""
    t, h, w = grid
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    angles = torch.cat(
        [
            _axis_angles(dim_t, t, theta)[:, None, None, :].expand(t, h, w, dim_t),
            _axis_angles(dim_hw, h, theta)[None, :, None, :].expand(t, h, w, dim_hw),
            _axis_angles(dim_hw, w, theta)[None, None, :, :].expand(t, h, w, dim_hw),
        ],
        dim=-1,
    ).reshape(t * h * w, head_dim)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (S, B, heads, D) by per-token tables (S, D); computed in fp32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    return (x.float() * cos + rotated * sin).to(x.dtype)
