"""Model presets and the option values the model implements.

Plain data, importable without megatron, so a run configuration validates (and a YAML parses)
without loading the model code.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, text_hidden_size=64),
    # from-scratch checks on one GPU (examples/convergence.yaml): MfM's heads of 64, ~1/45 of MfM-2B
    "small": dict(num_layers=8, hidden_size=512, num_attention_heads=8, text_hidden_size=512),
    # small at twice the width (~4x the GEMM FLOPs, the same kernels): the recipe's step is set by
    # the host's launches, not by the GPU (docs/TRAINING.md), so width costs little time there
    "base": dict(num_layers=8, hidden_size=1024, num_attention_heads=16, text_hidden_size=512),
    "mfm-2b": dict(num_layers=28, hidden_size=1792, num_attention_heads=28, text_hidden_size=2048),
    "mfm-8b": dict(num_layers=40, hidden_size=3072, num_attention_heads=48, text_hidden_size=2048),
}

CONTEXT_PARALLEL_COMM = ("a2a", "p2p")
"""Context-parallel attention exchanges we implement (megatron's ``cp_comm_type`` values)."""

SELECTIVE_RECOMPUTE_MODULES = ("layernorm", "mlp", "mlp_act")
"""Parts of a block that selective recompute can drop and recompute in backward."""

OUTPUT_RECOMPUTE_MODULES = ("layernorm", "mlp_act")
"""The modules of ``SELECTIVE_RECOMPUTE_MODULES`` that free one output once its consumer has run
and recompute it when backward reaches that consumer (megatron's ``CheckpointWithoutOutput``):
no block recompute, so they combine with full or auto recompute of the blocks."""

ATTENTION_BACKENDS = ("auto", "fa4", "cudnn", "sdpa")
"""Core attentions of ``model.attention_backend`` (``model/attention_backends``)."""

TUNED_GLUE = "tuned"
"""``model.compile_glue: tuned``: inductor's coordinate-descent tuning of each compiled kernel's
launch configuration, at ~1 min more compilation per clip shape (MfM-2B on an H200: the glue's
kernels 75 -> 60 ms a step, the step 1.097 -> 1.089 s; docs/PERFORMANCE.md, session 12)."""
