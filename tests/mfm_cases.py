"""Tiny MfM configurations and random inputs shared by the parity tests."""

from __future__ import annotations

import torch

from benchmarks.plain_mfm import Attention, ReferenceMfM, softmax_attention

# Tiny but complete: 2 layers, 4 heads of 32, text width 48, attention biases on.
TINY = dict(layers=2, heads=4, head_dim=32, text_dim=48, bias=True)


def make_reference(seed: int = 0, attention: Attention = softmax_attention, **overrides) -> ReferenceMfM:
    """Reference model with every parameter random (official init zeroes the adaLN and head
    projections, which would hide most of the network from a parity test); the same ``seed``
    gives the same weights whatever the ``attention``."""
    spec = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = ReferenceMfM(spec["layers"], spec["heads"], spec["head_dim"], spec["text_dim"], bias=spec["bias"],
                         attention=attention)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 0
            p.copy_(torch.randn_like(p) * (fan_in**-0.5 if fan_in else 0.1))
        for block in model.transformer_blocks:
            for norm in (block.norm2, block.norm3, block.attn1.q_norm, block.attn1.k_norm,
                         block.attn2.q_norm, block.attn2.k_norm):
                norm.weight.add_(1.0)
    return model


def megatron_config_kwargs(**overrides) -> dict:
    spec = {**TINY, **overrides}
    return dict(
        num_layers=spec["layers"],
        hidden_size=spec["heads"] * spec["head_dim"],
        num_attention_heads=spec["heads"],
        text_hidden_size=spec["text_dim"],
        attention_bias=spec["bias"],
    )


def make_inputs(frames: int, with_condition: bool = True, batch: int = 2, seed: int = 1) -> dict:
    """Latents (B,16,T,4,6), timestep, text with a padding mask, pixel condition, motion score."""
    g = torch.Generator().manual_seed(seed)
    h, w, text_len = 4, 6, 7
    pixel_frames = 4 * (frames - 1) + 1
    text_mask = torch.ones(batch, text_len)
    text_mask[0, 4:] = 0  # first prompt is padded
    if with_condition:
        condition = torch.randn(batch, 5, pixel_frames, 8 * h, 8 * w, generator=g)
    else:
        condition = torch.zeros(batch, 5, pixel_frames, 8 * h, 8 * w)
    return dict(
        latents=torch.randn(batch, 16, frames, h, w, generator=g),
        timestep=torch.tensor([937.0, 41.0][:batch]),
        text=torch.randn(batch, text_len, TINY["text_dim"], generator=g),
        text_mask=text_mask,
        condition=condition,
        motion_score=torch.tensor([5.0, 0.0][:batch]),
    )
