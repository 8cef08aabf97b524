"""An independent plain-PyTorch MfM transformer, written from the official model's description.

It uses the official parameter names and (B, S, D) tensors, separate q/k/v projections, and
shares no code with the megatron model. That independence gives it two jobs:

- the yardstick of the tests: with explicit softmax attention (``softmax_attention``) in fp32,
  the megatron model must match it;
- the plain baseline of ``benchmarks/profile_throughput.py --compare-plain``: with
  ``F.scaled_dot_product_attention`` (``sdpa_attention``) in bf16, it is what a straightforward
  PyTorch implementation of the same architecture costs.

Any dtype works: the residual stream keeps the weights' dtype, and norms, modulation and RoPE
run in fp32, as in the megatron model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# attention(q, k, v (B, heads, S, D), key_mask (B, S_kv) 1 = attend, or None) -> (B, heads, S, D)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with the score matrix written out: the tests' exact yardstick."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def sdpa_attention(backends: Sequence[SDPBackend] = ()) -> Attention:
    """``F.scaled_dot_product_attention`` restricted to ``backends``, tried in that order (a
    cross-attention with padded keys falls through to the first that takes a mask). Empty:
    torch's own choice, which changes between versions and shapes, so a benchmark names them."""
    chosen = list(backends)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        with sdpa_kernel(chosen, set_priority=True) if chosen else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return attention


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class RefTimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
        args = t.float()[:, None] * freqs[None]
        sinusoid = torch.cat([args.cos(), args.sin()], dim=1).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class RefTimeEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = RefTimestepEmbedding(dim)
        self.guidance_embedder = RefTimestepEmbedding(dim)


class RefAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int, bias: bool, attention: Attention):
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.q_norm = RefRMSNorm(dim)
        self.k_norm = RefRMSNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                rope_on_k: bool, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(b, s, self.heads, -1).transpose(1, 2)
        k = self.k_norm(self.k_proj(context)).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v_proj(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        q = rotate(q, *rope)
        if rope_on_k:
            k = rotate(k, *rope)
        out = self.attention(q, k, v, key_mask)  # (B, heads, S, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class RefFeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class RefAdaNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, text_dim: int, bias: bool, attention: Attention):
        super().__init__()
        self.norm1 = RefAdaNorm(dim)
        self.attn1 = RefAttention(dim, dim, heads, bias, attention)
        self.norm2 = RefRMSNorm(dim)
        self.attn2 = RefAttention(dim, text_dim, heads, bias, attention)
        self.norm3 = RefRMSNorm(dim)
        self.ff = RefFeedForward(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mods = self.norm1.linear(F.silu(c)).float().chunk(6, dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, :] for m in mods)
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6) * (1 + scale1) + shift1
        x = x + (gate1 * self.attn1(h.to(x.dtype), h.to(x.dtype), rope, rope_on_k=True).float()).to(x.dtype)
        x = x + self.attn2(self.norm2(x), text, rope, rope_on_k=False, key_mask=text_mask)
        h = self.norm3(x).float() * (1 + scale2) + shift2
        return x + (gate2 * self.ff(h.to(x.dtype)).float()).to(x.dtype)


def rope_tables(t: int, h: int, w: int, head_dim: int, device: torch.device | None = None,
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (t*h*w, head_dim) for interleaved 3D RoPE split D/4, 3D/8, 3D/8."""
    def axis(dim: int, n: int) -> torch.Tensor:
        freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        ang = torch.arange(n, dtype=torch.float32, device=device)[:, None] * freq[None]
        return torch.stack([ang, ang], dim=-1).reshape(n, dim)

    dt, dhw = head_dim // 4, head_dim * 3 // 8
    tt, hh, ww = torch.meshgrid(*(torch.arange(n, device=device) for n in (t, h, w)), indexing="ij")
    ang = torch.cat(
        [axis(dt, t)[tt.flatten()], axis(dhw, h)[hh.flatten()], axis(dhw, w)[ww.flatten()]], dim=-1
    )
    return ang.cos(), ang.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation of x (B, heads, S, D)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    c, s = cos[:, 0::2], sin[:, 0::2]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


class RefConditionEncoder(nn.Module):
    """cond_conv: conv_in, 4 x (conv, downsample Conv3d/Conv2d alternating), conv_out."""

    def __init__(self, in_ch: int, dim: int, chans: tuple[int, ...] = (16, 32, 96, 256, 512)):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, chans[0], 3, padding=1)
        layers = []
        for i in range(4):
            layers.append(nn.Conv2d(chans[i], chans[i], 3, padding=1))
            conv = nn.Conv3d if i % 2 == 0 else nn.Conv2d
            layers.append(conv(chans[i], chans[i + 1], 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(layers)
        self.conv_out = nn.Conv2d(chans[-1], dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, F, H, W)
        def per_frame(conv: nn.Module, v: torch.Tensor) -> torch.Tensor:
            b, c, f, h, w = v.shape
            y = conv(v.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
            return y.reshape(b, f, *y.shape[1:]).permute(0, 2, 1, 3, 4)

        x = F.silu(per_frame(self.conv_in, x))
        for conv in self.blocks:
            x = F.silu(conv(x) if isinstance(conv, nn.Conv3d) else per_frame(conv, x))
        return per_frame(self.conv_out, x)


class RefPatchEmbed(nn.Module):
    def __init__(self, in_ch: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch)


class ReferenceMfM(nn.Module):
    """The official ``Transformer3DModel``'s math and parameter names; ``attention`` computes
    both attentions of every block (``softmax_attention`` or ``sdpa_attention(...)``)."""

    def __init__(self, layers: int, heads: int, head_dim: int, text_dim: int, in_channels: int = 16,
                 patch: int = 2, bias: bool = False, depth: bool = True, attention: Attention = softmax_attention):
        super().__init__()
        dim = heads * head_dim
        self.head_dim, self.patch, self.out_channels = head_dim, patch, in_channels
        self.pos_embed = RefPatchEmbed(in_channels, dim, patch)
        self.cond_conv = RefConditionEncoder(5 if depth else 4, dim)
        self.time_embedder = RefTimeEmbedder(dim)
        self.transformer_blocks = nn.ModuleList(
            RefBlock(dim, heads, text_dim, bias, attention) for _ in range(layers)
        )
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, patch * patch * in_channels)

    @classmethod
    def from_official_config(cls, official: dict[str, Any], attention: Attention = softmax_attention) -> ReferenceMfM:
        """The model an official ``transformer/config.json`` (parsed) describes."""
        return cls(official["num_layers"], official["num_attention_heads"], official["attention_head_dim"],
                   official["cross_attention_dim"], in_channels=official["in_channels"],
                   patch=official["patch_size"], bias=official["attention_bias"],
                   depth=official["use_depth_cond"], attention=attention)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None, condition: torch.Tensor, motion_score: torch.Tensor) -> torch.Tensor:
        b, _, t, hh, ww = latents.shape
        p = self.patch
        h, w = hh // p, ww // p
        frames = latents.permute(0, 2, 1, 3, 4).reshape(b * t, -1, hh, ww)
        x = self.pos_embed.proj(frames).reshape(b, t, -1, h, w).permute(0, 2, 1, 3, 4)
        x = x + self.cond_conv(condition)
        x = x.flatten(2).transpose(1, 2)  # (B, t*h*w, D)
        c = self.time_embedder.timestep_embedder(timestep) + self.time_embedder.guidance_embedder(motion_score)
        rope = rope_tables(t, h, w, self.head_dim, latents.device)
        for block in self.transformer_blocks:
            x = block(x, c, text, text_mask, rope)
        shift, scale = self.proj_out_1(F.silu(c)).float().chunk(2, dim=1)
        x = (F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)
        x = self.proj_out_2(x)  # (B, t*h*w, p*p*C)
        x = x.reshape(b, t, h, w, p, p, self.out_channels)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.out_channels, t, h * p, w * p)
