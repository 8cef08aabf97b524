"""On a GPU the torch-native spec's attention runs on the SDPA backend timed fastest per shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_mfm.model.attention_backends.sdpa import GPU_SDPA_BACKENDS, SDPACoreAttention, fastest_sdpa_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("masked", [False, True], ids=["self", "masked-cross"])
def test_chosen_backend_runs_the_shape_and_matches_math(masked):
    """The pick is one of the fused backends that accept the inputs (flash takes no mask), is
    cached, and the attention on it equals the math backend to bf16 rounding."""
    tokens, batch, heads, dim, keys = 2048, 2, 8, 64, 80 if masked else 2048
    q = torch.randn(tokens, batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(keys, batch, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(batch, keys, device="cuda", dtype=torch.bool) if masked else None
    if masked:
        mask[0, 60:] = False
    attention = SDPACoreAttention(None, cross_attention=masked)
    out = attention(q, k, v, mask)
    shapes = ((batch, heads, tokens, dim), (batch, heads, keys, dim), torch.bfloat16, q.device, masked)
    backend = fastest_sdpa_backend(*shapes, attention.candidates)
    assert backend in GPU_SDPA_BACKENDS and not (masked and backend == SDPBackend.FLASH_ATTENTION)
    assert fastest_sdpa_backend.cache_info().hits >= 1
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(
            *(t.permute(1, 2, 0, 3).float() for t in (q, k, v)),
            attn_mask=None if mask is None else mask[:, None, None, :]).permute(2, 0, 1, 3).flatten(2)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
