"""Core attention backends (``model.attention_backend``): one module each, chosen here.

    auto   FA4 where it runs (sm90/sm100 GPU, flash_attn.cute imports, 16-bit), else cudnn on a
           GPU with the TE spec, sdpa otherwise (on the CPU: torch's bit-reproducible choice)
    fa4    FlashAttention-4 (``fa4.py``), both specs, all-to-all CP and the ring
    cudnn  TE spec: Transformer Engine's fused attention (``te.py``, with TE's own ring);
           torch-native spec: SDPA on cuDNN (``sdpa.py``)
    sdpa   F.scaled_dot_product_attention on the backend timed fastest per shape (``sdpa.py``)

A new backend is one module with a core attention class (``(S, B, heads, D)`` q/k/v and an
optional (B, S_k) key mask in, ``(S, B, heads*D)`` out, plus ``runs_ring``, ``ring_kernels`` and
``cuts_padded_keys``)
and a line in ``core_attention_spec`` and ``unavailable_reason``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mfm.model.attention_backends.fa4 import FA4CoreAttention, fa4_unavailable_reason
from megatron_mfm.model.attention_backends.sdpa import SDPACoreAttention
from megatron_mfm.model.presets import ATTENTION_BACKENDS


class AttentionBackendUnavailable(ValueError):
    """The chosen attention backend cannot run on this machine or at this precision."""


def unavailable_reason(backend: str, sixteen_bit: bool) -> str | None:
    """Why ``backend`` cannot run here at this precision, or None when it can."""
    if backend == "fa4":
        return "needs bf16 or fp8 precision (FA4 has no fp32 kernels)" if not sixteen_bit else fa4_unavailable_reason()
    if backend == "cudnn" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


def resolve_attention_backend(backend: str, sixteen_bit: bool, transformer_engine: bool) -> str:
    """The concrete backend for ``backend`` (``auto`` resolved); raises
    ``AttentionBackendUnavailable`` with the reason when it cannot run here."""
    if backend not in ATTENTION_BACKENDS:
        raise AttentionBackendUnavailable(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        if unavailable_reason("fa4", sixteen_bit) is None:
            return "fa4"
        return "cudnn" if torch.cuda.is_available() and transformer_engine else "sdpa"
    reason = unavailable_reason(backend, sixteen_bit)
    if reason:
        raise AttentionBackendUnavailable(f"attention backend {backend!r} {reason}")
    return backend


def core_attention_spec(backend: str, transformer_engine: bool) -> ModuleSpec | type:
    """The core attention module of a concrete backend in the TE or the torch-native spec."""
    if backend == "fa4":
        return FA4CoreAttention
    if backend == "cudnn" and transformer_engine:
        from megatron_mfm.model.attention_backends.te import TECoreAttention

        return TECoreAttention
    if backend == "cudnn":
        return ModuleSpec(module=SDPACoreAttention, params={"kernel": "cudnn"})
    if backend == "sdpa":
        return SDPACoreAttention
    raise ValueError(f"core_attention_spec: {backend!r} is not a concrete backend (resolve 'auto' first)")
