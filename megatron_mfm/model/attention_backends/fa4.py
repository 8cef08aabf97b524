"""Core attention through FlashAttention-4 (``flash_attn.cute`` from the ``flash-attn-4`` wheel,
CuTe DSL kernels JIT-compiled on first use): 1.25x cuDNN at head dim 64 on an H200, forward and
backward. bshd layout, 16-bit inputs, sm90 / sm100 only.

Masked keys run on cuDNN: FA4 4.0.0b36's backward with a per-sample count of used keys
(``seqused_k``) is wrong on sm90 (see ``FA4CoreAttention``). Padding that ends every sample at
the same row is cut off instead (``attention.attend``), so FA4 runs the self-attention outside
the ring (``TokenLayout`` pads for FP8, SP or CP divisibility) and the cross-attention to one
prompt (``model/dit.fit_text`` drops its padding; FP8 adds rows that are cut again); only
different prompts in one micro-batch keep a text mask.

Packed sequences: self-attention is one ``flash_attn_varlen_func`` call over the segments'
``cu_seqlens``; cross-attention to the packed text runs on cuDNN with the block mask; ring CP
over a packed sequence runs torch's masked kernels instead (``ring_attention``).

Ring CP: the forward kernel returns the log-sum-exp the ring merge needs (``return_lse``); the
ring's backward runs each block's backward from the FINAL output and LSE, which the public
autograd function does not expose, so ``FA4_RING_KERNELS`` call FA4's backward entry
(``_flash_attn_bwd``) directly.
"""

from __future__ import annotations

import functools

import torch

from megatron_mfm.model.attention_backends.sdpa import SDPACoreAttention
from megatron_mfm.model.packing import Segments
from megatron_mfm.parallel.ring_attention import BlockKernels

SUPPORTED_MAJOR_CAPABILITIES = (9, 10)
"""Hopper and Blackwell datacentre GPUs, where FA4 has forward and backward kernels."""

KEY_BLOCK = 128
"""Keys per CTA of FA4's sm90 backward, which runs one CTA per key block, head and sample."""
QUERY_CHUNKS = (8, 4, 2)
"""Chunk counts tried, largest first, for a cross-attention whose keys fit one key block."""
MIN_CHUNK_QUERIES = 1024
"""No chunk shorter: short sequences (the small recipe's 48 tokens) keep their one call."""


@functools.lru_cache(maxsize=1)
def fa4_unavailable_reason() -> str | None:
    """Why FA4 cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major not in SUPPORTED_MAJOR_CAPABILITIES:
        return f"needs an sm90 or sm100 GPU (this one is sm{major}{minor})"
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as error:  # ImportError, or the CuTe DSL runtime failing to load
        return f"flash_attn.cute does not import ({type(error).__name__}: {error}); pip install 'megatron_mfm[gpu]'"
    return None


def _interface():
    from flash_attn.cute import interface

    return interface


class FA4CoreAttention(torch.nn.Module):
    """FlashAttention-4; (S, B, heads, D) in, (S, B, heads*D) out. Padded query rows attend to
    the real keys (their outputs are dropped later), as with SDPA."""

    ring_kernels: BlockKernels
    """``ring_attention``'s block kernels: FA4's forward with LSE and its backward."""

    cuts_padded_keys = True
    """End-padded keys come cut off, not masked (``attention.attend``): FA4 runs them unmasked
    instead of sending them to the masked cuDNN path."""

    def __init__(self, config, cross_attention: bool):
        super().__init__()
        # Masked attention runs on cuDNN: FA4 4.0.0b36's backward with ``seqused_k`` gave wrong
        # dk/dv (0.8 relative error) for a masked 80-key cross-attention on an H200, and NaN
        # training losses (2026-11-29), and a wrong dv (0.25) for 937 of 1000 self-attention keys
        # (2026-11-30); unmasked keys are right (tests/gpu/test_fa4.py).
        self.masked_attention = SDPACoreAttention(config, cross_attention, kernel="cudnn")
        self.ring_kernels = FA4_RING_KERNELS

    def runs_ring(self, query: torch.Tensor, key_padding_mask: torch.Tensor | None) -> bool:
        """FA4 sees only local tokens: ring CP goes through ``ring_attention`` (with FA4 kernels)."""
        return False

    def forward(self, query, key, value, key_padding_mask: torch.Tensor | Segments | None = None) -> torch.Tensor:
        if isinstance(key_padding_mask, torch.Tensor) or (
                isinstance(key_padding_mask, Segments) and key_padding_mask.cu_seqlens is None):
            # padded keys; or a packed cross-attention: queries and text keys hold different
            # segments, so no shared ``cu_seqlens`` (the block mask over all text keys)
            return self.masked_attention(query, key, value, key_padding_mask)
        fa4 = _interface()
        if isinstance(key_padding_mask, Segments):  # a packed sequence: one varlen call, batch 1
            segments = key_padding_mask
            out, _ = fa4.flash_attn_varlen_func(  # keywords: the fourth positional parameter is qv
                query[:, 0], key[:, 0], value[:, 0], cu_seqlens_q=segments.cu_seqlens,
                cu_seqlens_k=segments.cu_seqlens, max_seqlen_q=segments.max_seqlen, max_seqlen_k=segments.max_seqlen)
            return out.flatten(1)[:, None]
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # (B, S, heads, D)
        return fold_query_chunks(lambda *qkv: fa4.flash_attn_func(*qkv)[0], q, k, v).transpose(0, 1).flatten(2)


def fold_query_chunks(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attend(q, k, v)`` (bshd) with the queries cut into chunks folded into the batch, each
    against its sample's keys, when the keys fit one of FA4's backward key blocks: the MfM text
    cross-attention (77 keys, one block) would otherwise run its backward on one CTA per head
    and sample, 28 of an H200's 132 SMs, each walking all 22k queries (~1.1 ms per transformer
    block, against 16 ms for the whole self-attention backward: docs/PERFORMANCE.md, session 9).
    Each query's row is computed as before; dK/dV come back summed over the chunks by autograd."""
    batch, queries = q.shape[:2]
    chunks = next((c for c in QUERY_CHUNKS if queries % c == 0 and queries // c >= MIN_CHUNK_QUERIES), 1)
    if chunks == 1 or k.shape[1] > KEY_BLOCK:
        return attend(q, k, v)
    folded = q.reshape(batch * chunks, queries // chunks, *q.shape[2:])
    out = attend(folded, *(t.repeat_interleave(chunks, dim=0) for t in (k, v)))
    return out.reshape(batch, queries, *out.shape[2:])


def _attend(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring block, (B, heads, S, D) -> (out (B, heads, S, D), LSE (B, heads, S) fp32)."""
    out, lse = _interface().flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=scale,
                                            return_lse=True)
    return out.transpose(1, 2), lse


def _attend_backward(dout, q, k, v, out, lse, scale: float) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of one ring block, (B, heads, S, D), from the final out and LSE."""
    grads = _interface()._flash_attn_bwd(*(t.transpose(1, 2) for t in (q, k, v, out, dout)), lse.contiguous(),
                                         softmax_scale=scale, causal=False)
    return tuple(g.transpose(1, 2) for g in grads[:3])


FA4_RING_KERNELS = BlockKernels(attend=_attend, attend_backward=_attend_backward)
