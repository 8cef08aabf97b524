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

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

from megatron_mfm.model.norms import layer_norm, rms_norm
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
# fp32. Modulation tensors are (1, B, D), broadcast over the tokens (dim 0); their gradients are
# summed over dim 0. Norm statistics are recomputed in backward from the saved 16-bit input.

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


def layer_norm_modulate_forward(x, shift, scale):
    normed, _ = _layer_norm32(x.float(), LAYER_NORM_EPS)
    return (normed * (1 + scale) + shift).to(x.dtype)


def layer_norm_modulate_backward(grad, x, shift, scale):
    normed, rstd = _layer_norm32(x.float(), LAYER_NORM_EPS)
    grad = grad.float()
    grad_x = _layer_norm_input_grad(grad * (1 + scale), normed, rstd)
    return grad_x.to(x.dtype), grad.sum(0, keepdim=True), (grad * normed).sum(0, keepdim=True)


def rms_norm_forward(x, weight, eps):
    normed, _ = _rms_norm32(x.float(), eps)
    return (normed * weight).to(x.dtype)


def rms_norm_backward(grad, x, weight, eps):
    normed, rstd = _rms_norm32(x.float(), eps)
    grad = grad.float()
    grad_weight = (grad * normed).flatten(0, -2).sum(0)
    return _rms_norm_input_grad(grad * weight, normed, rstd).to(x.dtype), grad_weight.to(weight.dtype)


def rms_norm_modulate_forward(x, weight, shift, scale, eps):
    normed, _ = _rms_norm32(x.float(), eps)
    return (normed * weight * (1 + scale) + shift).to(x.dtype)


def rms_norm_modulate_backward(grad, x, weight, shift, scale, eps):
    normed, rstd = _rms_norm32(x.float(), eps)
    grad = grad.float()
    grad_scale = (grad * normed * weight).sum(0, keepdim=True)
    grad_weighted = grad * (1 + scale)  # d/d(normed * weight)
    grad_weight = (grad_weighted * normed).flatten(0, -2).sum(0)
    grad_x = _rms_norm_input_grad(grad_weighted * weight, normed, rstd)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad.sum(0, keepdim=True), grad_scale


def norm_rope_forward(x, weight, cos, sin, eps):
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
    return _rope32(grad.float(), cos, -sin).to(grad.dtype)


def gated_residual_forward(x, gate, y):
    return (x.float() + gate * y.float()).to(x.dtype)


def gated_residual_backward(grad, gate, y):
    return (gate * grad.float()).to(y.dtype), (grad.float() * y.float()).sum(0, keepdim=True)


FUSED_KERNELS = (
    layer_norm_modulate_forward, layer_norm_modulate_backward, rms_norm_forward, rms_norm_backward,
    rms_norm_modulate_forward, rms_norm_modulate_backward, norm_rope_forward, norm_rope_backward,
    rope_forward, rope_backward, gated_residual_forward, gated_residual_backward,
)


# ----------------------------------------------------------------------------- autograd regions


class _LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, shift, scale):
        ctx.kernels = kernels
        ctx.save_for_backward(x, shift, scale)
        return kernels.layer_norm_modulate_forward(x, shift, scale)

    @staticmethod
    def backward(ctx, grad):
        return None, *ctx.kernels.layer_norm_modulate_backward(grad, *ctx.saved_tensors)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, weight, eps):
        ctx.kernels, ctx.eps = kernels, eps
        ctx.save_for_backward(x, weight)
        return kernels.rms_norm_forward(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        return None, *ctx.kernels.rms_norm_backward(grad, *ctx.saved_tensors, ctx.eps), None


class _RMSNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, weight, eps, shift, scale):
        ctx.kernels, ctx.eps = kernels, eps
        ctx.save_for_backward(x, weight, shift, scale)
        return kernels.rms_norm_modulate_forward(x, weight, shift, scale, eps)

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_weight, grad_shift, grad_scale = ctx.kernels.rms_norm_modulate_backward(
            grad, *ctx.saved_tensors, ctx.eps)
        return None, grad_x, grad_weight, None, grad_shift, grad_scale


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, weight, eps, cos, sin):
        ctx.kernels, ctx.eps = kernels, eps
        ctx.save_for_backward(x, weight, cos, sin)
        return kernels.norm_rope_forward(x, weight, cos, sin, eps)

    @staticmethod
    def backward(ctx, grad):
        return None, *ctx.kernels.norm_rope_backward(grad, *ctx.saved_tensors, ctx.eps), None, None, None


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, cos, sin):
        ctx.kernels = kernels
        ctx.save_for_backward(cos, sin)
        return kernels.rope_forward(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.kernels.rope_backward(grad, *ctx.saved_tensors), None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, gate, y):
        ctx.kernels = kernels
        ctx.save_for_backward(gate, y)
        return kernels.gated_residual_forward(x, gate, y)

    @staticmethod
    def backward(ctx, grad):
        grad_y, grad_gate = ctx.kernels.gated_residual_backward(grad, *ctx.saved_tensors)
        return None, grad, grad_gate, grad_y


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
def fused_glue(compiled: bool) -> BlockGlue:
    """The autograd regions over the fused kernels, compiled or (to test the math) not."""
    if compiled:
        # One specialised kernel per clip shape: static sizes ran the MfM-2B step 8% faster than
        # symbolic ones on an H100. A run meets a few dozen (buckets and tasks change the shape,
        # q/k come strided and contiguous), past dynamo's default of 8 per function; beyond
        # the limit a kernel runs uncompiled rather than failing the step (no fullgraph).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    kernels = SimpleNamespace(**{
        fn.__name__: torch.compile(fn, dynamic=False) if compiled else fn for fn in FUSED_KERNELS
    })
    return BlockGlue(
        layer_norm_modulate=functools.partial(_LayerNormModulate.apply, kernels),
        rms_norm_modulate=functools.partial(_RMSNormModulate.apply, kernels),
        rms_norm=functools.partial(_RMSNorm.apply, kernels),
        norm_rope=functools.partial(_NormRope.apply, kernels),
        rope=functools.partial(_Rope.apply, kernels),
        gated_residual=functools.partial(_GatedResidual.apply, kernels),
    )


def block_glue(compiled: bool) -> BlockGlue:
    """The glue of ``model.compile_glue``: eager ops, or the fused regions compiled (shared by
    all blocks, so each kernel is traced once per shape)."""
    return fused_glue(True) if compiled else EAGER_GLUE
