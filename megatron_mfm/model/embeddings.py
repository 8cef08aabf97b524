"""Input-side modules of the MfM DiT: patch embedding, condition adapter, timestep embeddings.

All are replicated across tensor-parallel ranks (they are small next to the blocks); their math
and parameter shapes follow the official model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from megatron_mfm.model.config import ADAPTER_CHANNELS

SILU_GAIN = 1.6765
"""1 / sqrt(E[silu(z)^2]) for z ~ N(0, 1): the weight gain that keeps a SiLU stack's variance."""


def timestep_sinusoid(t: torch.Tensor, channels: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t (B,) -> (B, channels), cos first, frequency shift 1 (official)."""
    half = channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - 1))
    angles = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def frames_to_batch(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W) for per-frame 2D layers, always as a fresh copy: a
    reshape would be a view for one frame and a copy otherwise, and torch.export would then pin
    the traced graph to the example's kind of clip (image or video). ``channels_last``: the copy
    is laid out (B, F, H, W, C) in memory, so the result is NHWC and, unflattened, NDHWC."""
    if channels_last:
        return x.permute(0, 2, 3, 4, 1).clone(memory_format=torch.contiguous_format).flatten(0, 1).permute(0, 3, 1, 2)
    return x.transpose(1, 2).clone(memory_format=torch.contiguous_format).flatten(0, 1)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on the 256-channel sinusoid."""

    def __init__(self, hidden_size: int, in_channels: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        nn.init.normal_(self.linear_1.weight, std=0.02)
        nn.init.normal_(self.linear_2.weight, std=0.02)
        nn.init.zeros_(self.linear_1.bias)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(timestep_sinusoid(t).to(dtype))))


class PatchEmbed(nn.Module):
    """Per-frame Conv2d patchify of the latent (B, C, T, H, W) -> (B, D, T, H/p, W/p)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.proj.weight.view(hidden_size, -1))  # like a Linear
        nn.init.zeros_(self.proj.bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        frames = latents.shape[2]
        x = self.proj(frames_to_batch(latents))
        return rearrange(x, "(b t) d h w -> b d t h w", t=frames)


class ConditionAdapter(nn.Module):
    """Pixel-space condition (B, 4|5, F, H, W) -> (B, D, F', H/16, W/16), added to the patches.

    conv_in, then four stages of (3x3 conv, stride-2 downsample) alternating Conv3d/Conv2d for
    the downsample (16x space, 4x time: 97 -> 49 -> 25 frames), SiLU after every conv but the
    last, conv_out to the model width. Module names match the official ``cond_conv``.

    Initialisation (ours; the official one is unpublished and only trained weights must match):
    variance-preserving normal weights with the SiLU gain for every conv but conv_out, which is
    Xavier like the patch embedding (with the SiLU gain: its input is a SiLU output); zero biases. PyTorch's default conv init shrinks the
    signal ~3.5x per layer, leaving the condition ~1e-6 of each token at the start (the model
    then learns to ignore it); this keeps it within an order of magnitude of the patch features.

    Memory layout: channels-last (NHWC / NDHWC) on CUDA, where cuDNN's kernels take it as it is;
    in NCHW it wraps each full-resolution convolution in layout transposes (MfM-2B, 97 x 352 x
    640, H200: forward + backward 50.5 ms in NCHW, 29.5 ms channels-last). The CPU keeps NCHW.
    ``channels_last`` overrides.
    """

    def __init__(self, in_channels: int, hidden_size: int, channels: tuple[int, ...] = ADAPTER_CHANNELS,
                 channels_last: bool | None = None):
        super().__init__()
        self.channels_last = channels_last
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        blocks: list[nn.Module] = []
        for stage, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            down = nn.Conv3d if stage % 2 == 0 else nn.Conv2d
            blocks.append(down(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(channels[-1], hidden_size, kernel_size=3, padding=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for conv in (self.conv_in, *self.blocks):
            nn.init.normal_(conv.weight, std=SILU_GAIN / math.sqrt(conv.weight[0].numel()))
        nn.init.xavier_uniform_(self.conv_out.weight.view(self.conv_out.out_channels, -1), gain=SILU_GAIN)
        for conv in (self.conv_in, *self.blocks, self.conv_out):
            nn.init.zeros_(conv.bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        channels_last = condition.is_cuda if self.channels_last is None else self.channels_last
        frames = condition.shape[2]
        x = F.silu(self.conv_in(frames_to_batch(condition, channels_last)))
        for block in self.blocks:
            if isinstance(block, nn.Conv3d):
                x = block(rearrange(x, "(b f) c h w -> b c f h w", f=frames))
                frames = x.shape[2]
                x = frames_to_batch(x, channels_last)
            else:
                x = block(x)
            x = F.silu(x)
        return rearrange(self.conv_out(x), "(b f) d h w -> b d f h w", f=frames)
