"""Normalisations of the MfM block, written for megatron's tensor/sequence parallelism.

- ``layer_norm``: LayerNorm without affine (adaLN pre-norms and the output head).
- ``rms_norm``: the RMSNorm math, fp32 statistics.
- ``RMSNorm``: learnable RMSNorm on (sequence-parallel) tokens; under SP its weight is marked
  ``sequence_parallel`` so megatron all-reduces its gradient across TP ranks.
- ``ShardedRMSNorm``: MfM's QK-norm, an RMSNorm over the WHOLE projected q (or k) vector, i.e.
  across all heads. Under TP each rank holds a slice of heads, so the sum of squares is
  all-reduced over the TP group (forward and backward) and the weight is sharded with the heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_mfm.model.config import MfMConfig
from megatron_mfm.parallel.collectives import all_reduce_sum


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim without learnable parameters."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with statistics in fp32 (as the official model)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x32).to(x.dtype)


class RMSNorm(torch.nn.Module):
    """RMSNorm with a learnable weight; statistics in fp32 (as the official model)."""

    def __init__(self, config: MfMConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Tokens are split across TP ranks under SP: each rank sees part of the gradient.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ShardedRMSNorm(MegatronModule):
    """RMSNorm over a vector whose last dim is split across TP ranks (this rank: a slice)."""

    def __init__(self, config: MfMConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__(config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size // tp, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        sum_sq = x32.pow(2).sum(-1, keepdim=True)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            sum_sq = all_reduce_sum(sum_sq, parallel_state.get_tensor_model_parallel_group())
        x32 = x32 * torch.rsqrt(sum_sq / self.hidden_size + self.eps)
        return (self.weight * x32).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)
