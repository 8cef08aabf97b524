"""The MfM block's elementwise glue, eager or fused.

Between its GEMMs and attention the block runs fp32 glue: the adaLN pre-norms and modulation, the
whole-vector QK RMSNorm and 3D RoPE, and the gated residuals. Run eagerly, every cast, statistic
and product is its own kernel reading and writing a whole (tokens, width) fp32 tensor, and
autograd keeps those fp32 intermediates until backward: at MfM-2B's 22k tokens on an H100 this
glue took about 40% of the GPU's step time, and more activation memory than the GEMM and
attention inputs together.

``block_glue(compiled=True)`` (``model.compile_glue``) runs each region as one autograd function
whose forward and backward are written out below and compiled by ``torch.compile`` into fused
kernels; it keeps only the region's 16-bit inputs for backward and recomputes the fp32 statistics
there. The backward is ours rather than AOTAutograd's: the compiled graphs are plain inference
graphs, and gradient shapes (the (1, B, D) modulation) are explicit. The eager functions are the
definition; the fused ones compute the same math in fp32, rounding to 16 bits once per region
instead of after each op.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_mfm.model.norms import layer_norm, rms_norm
from megatron_mfm.model.presets import TUNED_GLUE
from megatron_mfm.model.rope import apply_rope

# ----------------------------------------------------------------------------- eager (definition)


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


# ----------------------------------------------------------------------------- fused kernels
# Pure tensor functions (no autograd inside): forward and backward of each region, all math in
# fp32. Modulation tensors are (1, B, D), broadcast over the tokens (dim 0), their gradients
# summed over dim 0; or per token, (S, 1, D), for packed sequences. Norm statistics are
# recomputed in backward from the saved 16-bit input.

LAYER_NORM_EPS = 1e-6


def _layer_norm32(x32: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    centered = x32 - x32.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    return centered * rstd, rstd


def _rms_norm32(x32: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return x32 * rstd, rstd


def _layer_norm_input_grad(grad: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d/dx of LayerNorm (no affine) given d/d(normed)."""
    return rstd * (grad - grad.mean(-1, keepdim=True) - normed * (grad * normed).mean(-1, keepdim=True))


def _rms_norm_input_grad(grad: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d/dx of x * rstd(x) given d/d(normed)."""
    return rstd * (grad - normed * (grad * normed).mean(-1, keepdim=True))


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1) -> (-x1, x0) for each interleaved pair of the last dim (RoPE's rotation by 90°)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)


def _rope32(x32: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (S, B, heads, D) rotated by tables (S, D); -sin gives the transpose (backward), as both
    channels of a pair share one angle."""
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    return x32 * cos + _rotate_pairs(x32) * sin


def _modulation_grad(grad: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    """The gradient of a modulation tensor: summed over the tokens a (1, B, D) one was broadcast
    over; as it is for per-token (S, 1, D) ones (packed sequences)."""
    return grad if grad.shape[0] == modulation.shape[0] else grad.sum(0, keepdim=True)


def layer_norm_modulate_forward(x, shift, scale):
    normed, _ = _layer_norm32(x.float(), LAYER_NORM_EPS)
    return (normed * (1 + scale) + shift).to(x.dtype)


def layer_norm_modulate_backward(grad, x, shift, scale):
    normed, rstd = _layer_norm32(x.float(), LAYER_NORM_EPS)
    grad = grad.float()
    grad_x = _layer_norm_input_grad(grad * (1 + scale), normed, rstd)
    return grad_x.to(x.dtype), _modulation_grad(grad, shift), _modulation_grad(grad * normed, scale)


def rms_norm_forward(x, weight, eps):
    normed, _ = _rms_norm32(x.float(), eps)
    return (normed * weight).to(x.dtype)


def rms_norm_backward(grad, x, weight, eps):
    normed, rstd = _rms_norm32(x.float(), eps)
    grad = grad.float()
    grad_weight = (grad * normed).flatten(0, -2).sum(0)
    return _rms_norm_input_grad(grad * weight, normed, rstd).to(x.dtype), grad_weight.to(weight.dtype)


def rms_norm_modulate_forward(x, weight, eps, shift, scale):
    normed, _ = _rms_norm32(x.float(), eps)
    return (normed * weight * (1 + scale) + shift).to(x.dtype)


def rms_norm_modulate_backward(grad, x, weight, shift, scale, eps):
    normed, rstd = _rms_norm32(x.float(), eps)
    grad = grad.float()
    grad_scale = _modulation_grad(grad * normed * weight, scale)
    grad_weighted = grad * (1 + scale)  # d/d(normed * weight)
    grad_weight = (grad_weighted * normed).flatten(0, -2).sum(0)
    grad_x = _rms_norm_input_grad(grad_weighted * weight, normed, rstd)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), _modulation_grad(grad, shift), grad_scale


def norm_rope_forward(x, weight, eps, cos, sin):
    normed, _ = _rms_norm32(x.float().flatten(-2), eps)
    return _rope32((normed * weight).view(x.shape), cos, sin).to(x.dtype)


def norm_rope_backward(grad, x, weight, cos, sin, eps):
    normed, rstd = _rms_norm32(x.float().flatten(-2), eps)
    grad_weighted = _rope32(grad.float(), cos, -sin).flatten(-2)  # RoPE's transpose
    grad_weight = (grad_weighted * normed).flatten(0, -2).sum(0)
    grad_x = _rms_norm_input_grad(grad_weighted * weight, normed, rstd).view(x.shape)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


def rope_forward(x, cos, sin):
    return _rope32(x.float(), cos, sin).to(x.dtype)


def rope_backward(grad, cos, sin):
    return (_rope32(grad.float(), cos, -sin).to(grad.dtype),)


def gated_residual_forward(x, gate, y):
    return (x.float() + gate * y.float()).to(x.dtype)


def gated_residual_backward(grad, gate, y):
    return grad, _modulation_grad(grad.float() * y.float(), gate), (gate * grad.float()).to(y.dtype)


@dataclass(frozen=True)
class Region:
    """A fused region: ``forward(*args)``; ``backward(grad, *saved, *constants)`` returns the
    gradients of the arguments at ``grads``, in order. ``saved``: the tensor arguments backward
    reads; constants are the non-tensor arguments (eps)."""

    forward: Callable
    backward: Callable
    saved: tuple[int, ...]
    grads: tuple[int, ...]


REGIONS = {
    "layer_norm_modulate": Region(layer_norm_modulate_forward, layer_norm_modulate_backward, (0, 1, 2), (0, 1, 2)),
    "rms_norm_modulate": Region(rms_norm_modulate_forward, rms_norm_modulate_backward, (0, 1, 3, 4), (0, 1, 3, 4)),
    "rms_norm": Region(rms_norm_forward, rms_norm_backward, (0, 1), (0, 1)),
    "norm_rope": Region(norm_rope_forward, norm_rope_backward, (0, 1, 3, 4), (0, 1)),
    "rope": Region(rope_forward, rope_backward, (1, 2), (0,)),
    "gated_residual": Region(gated_residual_forward, gated_residual_backward, (1, 2), (0, 1, 2)),
}
"""Argument orders are the block's: (x, shift, scale), (x, weight, eps, shift, scale), (x, weight,
eps), (x, weight, eps, cos, sin), (x, cos, sin), (x, gate, y)."""


class _FusedRegion(torch.autograd.Function):
    """Runs a region's forward kernel and, in backward, its backward kernel on what it saved."""

    @staticmethod
    def forward(ctx, region: Region, *args):
        ctx.region, ctx.num_args = region, len(args)
        ctx.constants = [a for a in args if not isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(args[i] for i in region.saved))
        return region.forward(*args)

    @staticmethod
    def backward(ctx, grad):
        grads = [None] * ctx.num_args
        for index, value in zip(ctx.region.grads, ctx.region.backward(grad, *ctx.saved_tensors, *ctx.constants)):
            grads[index] = value
        return None, *grads


@dataclass(frozen=True)
class BlockGlue:
    """The glue regions one block calls; eager or fused."""

    layer_norm_modulate: Callable[..., torch.Tensor]
    rms_norm_modulate: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    norm_rope: Callable[..., torch.Tensor]
    rope: Callable[..., torch.Tensor]
    gated_residual: Callable[..., torch.Tensor]


EAGER_GLUE = BlockGlue(layer_norm_modulate, rms_norm_modulate, rms_norm, norm_rope, apply_rope, gated_residual)


@functools.cache
def fused_glue(compiled: bool, tuned: bool = False) -> BlockGlue:
    """The autograd regions over the fused kernels, compiled (its kernels ``tuned`` or not) or
    (to test the math) not."""
    if compiled:
        # One specialised kernel per clip shape: static sizes ran the MfM-2B step 8% faster than
        # symbolic ones on an H100. A run meets a few dozen (buckets and tasks change the shape,
        # q/k come strided and contiguous), past dynamo's default of 8 per function; beyond
        # the limit a kernel runs uncompiled rather than failing the step (no fullgraph).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    options = {"coordinate_descent_tuning": True} if tuned else None

    def fused(region: Region) -> Callable[..., torch.Tensor]:
        if compiled:
            region = dataclasses.replace(region, forward=torch.compile(region.forward, dynamic=False, options=options),
                                         backward=torch.compile(region.backward, dynamic=False, options=options))
        return functools.partial(_FusedRegion.apply, region)

    return BlockGlue(**{name: fused(region) for name, region in REGIONS.items()})


def block_glue(compiled: bool | str) -> BlockGlue:
    """The glue of ``model.compile_glue`` (false, true or ``TUNED_GLUE``): eager ops, or the fused
    regions compiled (shared by all blocks, so each kernel is traced once per shape)."""
    return fused_glue(True, compiled == TUNED_GLUE) if compiled else EAGER_GLUE
