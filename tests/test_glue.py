"""The fused glue regions (hand-written forward and backward) equal the eager definitions."""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.model.glue import EAGER_GLUE, fused_glue
from megatron_mfm.model.rope import rope_cos_sin

TOKENS, BATCH, HEADS, HEAD_DIM = 24, 2, 4, 16
WIDTH = HEADS * HEAD_DIM


def leaf(*shape: int, dtype=torch.float32, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=dtype) * scale + offset).requires_grad_()


def region_inputs(region: str, dtype: torch.dtype) -> tuple:
    """Arguments of ``region`` as the block passes them: activations in ``dtype``, modulation
    (1, B, D) fp32, norm weights near 1, q/k as strided views of a fused qkv projection."""
    x = leaf(TOKENS, BATCH, WIDTH, dtype=dtype)
    shift, scale, gate = (leaf(1, BATCH, WIDTH, scale=0.3) for _ in range(3))
    weight = leaf(WIDTH, dtype=dtype, scale=0.1, offset=1.0)
    cos, sin = rope_cos_sin((2, 3, 4), HEAD_DIM)
    qkv = leaf(TOKENS, BATCH, HEADS, 3, HEAD_DIM, dtype=dtype)
    q = qkv[:, :, :, 0]  # non-contiguous, as the block's unbind of linear_qkv's output
    return {
        "layer_norm_modulate": (x, shift, scale),
        "rms_norm_modulate": (x, weight, 1e-6, shift, scale),
        "rms_norm": (x, weight, 1e-6),
        "norm_rope": (q, weight, 1e-6, cos, sin),
        "rope": (q, cos, sin),
        "gated_residual": (x, gate, leaf(TOKENS, BATCH, WIDTH, dtype=dtype)),
    }[region]


def run(glue, region: str, args: tuple) -> tuple[torch.Tensor, list]:
    """Output and the gradients of every input that takes one, for a random output gradient."""
    output = getattr(glue, region)(*args)
    grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(7)).to(output.dtype)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return output, torch.autograd.grad(output, leaves, grad)


REGIONS = ("layer_norm_modulate", "rms_norm_modulate", "rms_norm", "norm_rope", "rope", "gated_residual")


@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_region_equals_eager(region, dtype):
    """Forward and every input gradient; fp32 to summation order, bf16 to its rounding (the
    fused region rounds once, eager after each op)."""
    torch.manual_seed(0)
    args = region_inputs(region, dtype)
    expected, expected_grads = run(EAGER_GLUE, region, args)
    actual, actual_grads = run(fused_glue(False), region, args)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    for name, a, e in [("output", actual, expected), *zip(range(len(actual_grads)), actual_grads, expected_grads)]:
        assert a.shape == e.shape and a.dtype == e.dtype, (name, a.shape, e.shape, a.dtype, e.dtype)
        error = ((a.float() - e.float()).norm() / e.float().norm()).item()
        assert error < tolerance, (region, name, error)
