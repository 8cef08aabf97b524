"""The plain reference's SDPA variant (the profiler's baseline) computes what its explicit-softmax
variant (the tests' yardstick) computes, and the reference runs in bf16."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from benchmarks.plain_mfm import sdpa_attention
from mfm_cases import make_inputs, make_reference


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_sdpa_equals_explicit_softmax_forward_and_gradients():
    softmax = make_reference()
    inputs = make_inputs(3)  # video with a condition, the first prompt padded
    for sdpa in (make_reference(attention=sdpa_attention()),
                 make_reference(attention=sdpa_attention([SDPBackend.MATH]))):
        expected, actual = softmax(**inputs), sdpa(**inputs)
        assert relative_error(actual, expected) < 1e-5
        weight = torch.randn_like(expected)
        softmax.zero_grad()
        torch.autograd.backward([(expected * weight).sum(), (actual * weight).sum()])
        grads = dict(sdpa.named_parameters())
        for name, p in softmax.named_parameters():
            assert p.grad.norm() > 0, name
            assert relative_error(grads[name].grad, p.grad) < 1e-5, name


def test_bf16_forward_stays_bf16_and_near_fp32():
    model = make_reference(attention=sdpa_attention())
    inputs = make_inputs(3)
    expected = model(**inputs)
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    actual = model.to(torch.bfloat16)(**low)
    assert actual.dtype == torch.bfloat16
    assert relative_error(actual.float(), expected) < 0.05
