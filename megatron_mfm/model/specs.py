"""Layer specs: which implementation backs each part of the MfM block.

``local_layer_spec`` uses megatron's torch-native parallel linears and SDPA; it runs everywhere
and is what the CPU tests exercise. ``te_layer_spec`` swaps in Transformer Engine linears and
fused attention (FP8-capable) and is selected on GPU when TE imports.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mfm.model.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SDPACoreAttention,
    SelfAttention,
    SelfAttentionSubmodules,
    TECoreAttention,
)
from megatron_mfm.model.layer import MLP, LayerSubmodules, MLPSubmodules, TransformerLayer


def _layer_spec(column: type, row: type, core_attention: type) -> ModuleSpec:
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


def local_layer_spec() -> ModuleSpec:
    """torch-native megatron layers + SDPA core attention."""
    return _layer_spec(ColumnParallelLinear, RowParallelLinear, SDPACoreAttention)


def te_layer_spec() -> ModuleSpec:
    """Transformer Engine linears and fused attention."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )

    return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, TECoreAttention)


def transformer_engine_available() -> bool:
    """True when TE is installed and a GPU is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def default_layer_spec(backend: str = "auto") -> ModuleSpec:
    """``auto`` picks TE on a GPU with TE installed, the local spec otherwise."""
    if backend == "local":
        return local_layer_spec()
    if backend == "te":
        if not transformer_engine_available():
            raise RuntimeError(
                "backend 'te' needs Transformer Engine on a GPU machine: "
                "pip install 'megatron_mfm[gpu]' (or use backend 'local')"
            )
        return te_layer_spec()
    if backend != "auto":
        raise ValueError(f"unknown layer backend {backend!r}; choose auto, te or local")
    return te_layer_spec() if transformer_engine_available() else local_layer_spec()
