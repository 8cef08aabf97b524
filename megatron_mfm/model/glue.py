"""The MfM block's elementwise glue, in regions that ``torch.compile`` fuses.

Between its GEMMs and attention the block runs fp32 glue: the adaLN pre-norms and modulation, the
whole-vector QK RMSNorm and 3D RoPE, and the gated residuals. Run eagerly, every cast, statistic
and product is its own kernel reading and writing a whole (tokens, width) fp32 tensor, and
autograd keeps those fp32 intermediates until backward: at MfM-2B's 22k tokens this glue takes
more memory than the GEMM and attention inputs together.

Each function below is one region. ``block_glue(compiled=True)`` (``model.compile_glue``) returns
them through ``torch.compile``: one fused kernel forward and one backward per region, which saves
only its 16-bit inputs and recomputes the fp32 intermediates in backward. The eager functions are
the definition; the compiled ones compute the same math, rounding to 16 bits once per region
instead of after each eager op.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_mfm.model.norms import layer_norm, rms_norm
from megatron_mfm.model.rope import apply_rope


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in fp32, back to x's dtype (shift/scale: (1, B, D) fp32)."""
    return (x.float() * (1 + scale) + shift).to(x.dtype)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN before self-attention and in the output head: modulate(LayerNorm(x))."""
    return modulate(layer_norm(x), shift, scale)


def rms_norm_modulate(
    x: torch.Tensor, weight: torch.Tensor, eps: float, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """adaLN before the MLP: modulate(RMSNorm(x))."""
    return modulate(rms_norm(x, weight, eps), shift, scale)


def norm_rope(
    x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """QK-norm then RoPE of x (S, B, heads, D): RMSNorm over all heads of a token at once (the
    whole projected vector, as MfM), then the 3D rotation per head."""
    normed = rms_norm(x.flatten(-2), weight, eps).view_as(x)
    return apply_rope(normed, cos, sin)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y, the product in fp32 (gate: (1, B, D) fp32)."""
    return (gate * y.float()).to(y.dtype) + x


@dataclass(frozen=True)
class BlockGlue:
    """The glue regions one block calls; eager or compiled."""

    layer_norm_modulate: Callable[..., torch.Tensor]
    rms_norm_modulate: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    norm_rope: Callable[..., torch.Tensor]
    rope: Callable[..., torch.Tensor]
    gated_residual: Callable[..., torch.Tensor]


@functools.cache
def block_glue(compiled: bool) -> BlockGlue:
    """The glue regions, shared by all blocks (so each compiled region is traced once per shape)."""
    regions = dict(
        layer_norm_modulate=layer_norm_modulate, rms_norm_modulate=rms_norm_modulate, rms_norm=rms_norm,
        norm_rope=norm_rope, rope=apply_rope, gated_residual=gated_residual,
    )
    if compiled:
        # One graph per region; token counts change with the bucket, so sizes go dynamic on the
        # second shape instead of recompiling for each.
        regions = {name: torch.compile(fn, fullgraph=True) for name, fn in regions.items()}
    return BlockGlue(**regions)
