"""GPU only: a packed sequence (data.packing) on each attention backend's varlen path equals its
samples run one by one on the same backend, outputs and every gradient within bf16 tolerance:
SDPA with the block mask (cuDNN / memory-efficient), FA4 ``flash_attn_varlen_func`` and
Transformer Engine's THD fused attention over ``cu_seqlens``.

    python -m pytest tests/gpu/test_packing_gpu.py -v
"""

from __future__ import annotations

import contextlib

import pytest
import torch

with contextlib.suppress(ImportError):  # TE before any cuDNN attention, or it may load another cuDNN
    import transformer_engine.pytorch  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16_TOLERANCE = 2e-2
GROUPS = [(2, 1, 16, 16), (1, 5, 16, 24), (1, 3, 8, 8)]
"""(samples, latent frames, height, width): 2 images of 64 tokens, clips of 480 and 48 tokens."""


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def world():
    from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(seed=0)
    yield
    destroy_parallel()


def packed_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    samples = sum(b for b, *_ in GROUPS)
    text_mask = torch.ones(samples, 77)
    text_mask[0, 20:] = 0
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    return dict(
        latents=[torch.randn(b, 16, t, h, w, generator=g).to(**bf16) for b, t, h, w in GROUPS],
        timestep=torch.tensor([900.0, 150.0, 500.0, 20.0], device="cuda"),
        text=torch.randn(samples, 77, 128, generator=g).to(**bf16), text_mask=text_mask.cuda(),
        condition=[torch.randn(b, 5, 4 * (t - 1) + 1, 8 * h, 8 * w, generator=g).to(**bf16) for b, t, h, w in GROUPS],
        motion_score=torch.tensor([5.0, 0.0, 2.0, 1.0], device="cuda"))


def alone(model, inputs: dict) -> list[torch.Tensor]:
    """Each group's output with every sample run through the unpacked forward alone."""
    outputs, sample = [], 0
    for group, latents in enumerate(inputs["latents"]):
        rows = []
        for row in range(latents.shape[0]):
            pick = slice(sample, sample + 1)
            rows.append(model(latents[row:row + 1], inputs["timestep"][pick], inputs["text"][pick],
                              inputs["text_mask"][pick], inputs["condition"][group][row:row + 1],
                              inputs["motion_score"][pick]))
            sample += 1
        outputs.append(torch.cat(rows))
    return outputs


def backward(outputs: list[torch.Tensor]) -> None:
    sum((out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum()
        for out in outputs).backward()


@pytest.mark.parametrize("spec,attention", [("local", "sdpa"), ("local", "fa4"), ("te", "cudnn"), ("te", "fa4")])
def test_packed_sequence_matches_samples_alone(world, spec, attention):
    from megatron_mfm.model import MfMDiT
    from megatron_mfm.model.attention_backends import unavailable_reason
    from megatron_mfm.model.config import make_config
    from megatron_mfm.model.specs import default_layer_spec, transformer_engine_available

    if spec == "te" and not transformer_engine_available():
        pytest.skip("needs Transformer Engine")
    if unavailable_reason(attention, True):
        pytest.skip(unavailable_reason(attention, True))
    config = make_config(num_layers=2, hidden_size=256, num_attention_heads=4, text_hidden_size=128,
                         attention_bias=True, params_dtype=torch.bfloat16, bf16=True)
    model = MfMDiT(config, default_layer_spec(spec, attention)).cuda()
    torch.manual_seed(0)
    with torch.no_grad():  # official init zeroes the adaLN/head: make every path matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5 if p.dim() > 1 else 0.1 * torch.randn_like(p) + 1)
    inputs = packed_inputs()
    backward(alone(model, inputs))
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():
        expected = alone(model, inputs)
    packed = model(**inputs)
    backward(packed)
    out_error = max(relative_error(out, exp) for out, exp in zip(packed, expected))
    worst = max((relative_error(p.grad, expected_grads[n]), n) for n, p in model.named_parameters())
    print(f"{spec}/{attention}: output {out_error:.1e}, worst gradient {worst}")
    assert out_error < BF16_TOLERANCE and worst[0] < 5 * BF16_TOLERANCE
