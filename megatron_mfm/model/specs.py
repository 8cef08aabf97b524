"""Layer specs: which implementation backs each part of the MfM block.

``local_layer_spec`` uses megatron's torch-native parallel linears; it runs everywhere and is what
the CPU tests exercise. ``te_layer_spec`` swaps in Transformer Engine linears (FP8-capable) and is
selected on GPU when TE imports. Either takes any core attention of ``attention_backends``
(default: Transformer Engine's fused attention in the TE spec, timed SDPA in the local one).
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mfm.model.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron_mfm.model.attention_backends import core_attention_spec
from megatron_mfm.model.layer import MLP, LayerSubmodules, MLPSubmodules, TransformerLayer


def _layer_spec(column: type, row: type, core_attention: ModuleSpec | type) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=LayerSubmodules(
            # Tiny GEMM on (B, D) that needs a gathered output: megatron's linear in every spec.
            adaln=ColumnParallelLinear,
            self_attention=ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column, core_attention=core_attention, linear_proj=row
                ),
            ),
            cross_attention=ModuleSpec(
                module=CrossAttention,
                submodules=CrossAttentionSubmodules(
                    linear_q=column, linear_kv=column, core_attention=core_attention, linear_proj=row
                ),
            ),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def local_layer_spec(attention_backend: str = "sdpa") -> ModuleSpec:
    """torch-native megatron layers + the core attention of ``attention_backend`` (concrete)."""
    return _layer_spec(ColumnParallelLinear, RowParallelLinear, core_attention_spec(attention_backend, False))


def te_layer_spec(attention_backend: str = "cudnn") -> ModuleSpec:
    """Transformer Engine linears + the core attention of ``attention_backend`` (concrete)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )

    return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, core_attention_spec(attention_backend, True))


def transformer_engine_available() -> bool:
    """True when TE is installed and a GPU is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def uses_transformer_engine(backend: str) -> bool:
    """Whether layer backend ``backend`` (auto, te, local) builds the TE spec here."""
    if backend not in ("auto", "te", "local"):
        raise ValueError(f"unknown layer backend {backend!r}; choose auto, te or local")
    if backend == "te" and not transformer_engine_available():
        raise RuntimeError(
            "backend 'te' needs Transformer Engine on a GPU machine: "
            "pip install 'megatron_mfm[gpu]' (or use backend 'local')"
        )
    return backend == "te" or (backend == "auto" and transformer_engine_available())


def default_layer_spec(backend: str = "auto", attention_backend: str | None = None) -> ModuleSpec:
    """``auto`` picks TE on a GPU with TE installed, the local spec otherwise; the attention
    backend must be concrete (``attention_backends.resolve_attention_backend``); None: the spec's
    default."""
    te = uses_transformer_engine(backend)
    spec = te_layer_spec if te else local_layer_spec
    return spec() if attention_backend is None else spec(attention_backend)
