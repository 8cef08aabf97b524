"""FA4's cross-attention folds query chunks into the batch (``fold_query_chunks``): the fold's
arithmetic checked on the CPU with SDPA in its place (FA4 itself: tests/gpu/test_fa4.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_mfm.model.attention_backends.fa4 import fold_query_chunks


def sdpa_bshd(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def leaves(batch: int, queries: int, keys: int, heads: int = 2, dim: int = 8):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, rows, heads, dim, generator=generator, dtype=torch.float64, requires_grad=True)
            for rows in (queries, keys, keys)]


def test_folded_attention_equals_one_call_with_every_gradient():
    """Two samples of 4,096 queries against 77 keys: 4 chunks a sample, same output and grads."""
    calls = []

    def attend(q, k, v):
        calls.append((q.shape[:2], k.shape[:2]))
        return sdpa_bshd(q, k, v)

    results = []
    for fold in (True, False):
        q, k, v = leaves(batch=2, queries=4096, keys=77)
        out = fold_query_chunks(attend, q, k, v) if fold else sdpa_bshd(q, k, v)
        out.backward(torch.ones_like(out).cumsum(1) / 4096)
        results.append([out.detach(), q.grad, k.grad, v.grad])
    assert calls == [((8, 1024), (8, 77))]
    for folded, plain in zip(*results):
        torch.testing.assert_close(folded, plain, rtol=1e-12, atol=1e-12)


def test_only_long_queries_against_one_key_block_are_folded():
    shapes = []

    def attend(q, k, v):
        shapes.append(q.shape[:2])
        return sdpa_bshd(q, k, v)

    for queries, keys in ((22000, 77), (22000, 129), (48, 48), (1025, 77)):
        fold_query_chunks(attend, *leaves(1, queries, keys, heads=1, dim=4))
    # 22,000 queries: 8 chunks of 2,750; more than 128 keys, the recipe's 48-token clips and a
    # length with no chunk of >= 1,024 queries run as one call
    assert shapes == [(8, 2750), (1, 22000), (1, 48), (1, 1025)]
