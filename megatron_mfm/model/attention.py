"""Self- and cross-attention of the MfM block (core attentions: ``attention_backends/``).

Tensors are megatron-shaped: tokens (S, B, hidden). Under TP each rank owns a contiguous slice of
heads; the fused projections are laid out per head ([q_h, k_h, v_h] for ``linear_qkv``,
[k_h, v_h] for ``linear_kv``) so a rank's shard is exactly its heads' rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_mfm.model.config import MfMConfig
from megatron_mfm.model.glue import BlockGlue, block_glue
from megatron_mfm.model.norms import ShardedRMSNorm
from megatron_mfm.model.packing import Segments
from megatron_mfm.parallel.context import heads_to_sequence, sequence_to_heads
from megatron_mfm.parallel.ring_attention import BlockMasks, ring_attention


def xavier_uniform(fan_in: int, fan_out: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Xavier-uniform init with explicit fans, so fused or TP-sharded weights draw from the same
    distribution as the official separate ``nn.Linear`` layers."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return lambda weight: torch.nn.init.uniform_(weight, -bound, bound)


def without_sequence_parallel(config: MfMConfig) -> MfMConfig:
    """Config for linears whose input is not split along the sequence (text, timestep)."""
    if not config.sequence_parallel:
        return config
    return dataclasses.replace(config, sequence_parallel=False)


@dataclass(frozen=True)
class RealRows:
    """How many leading rows of a clip's padded sequences are real, the same in every sample (so
    known on the host); None where nothing is padded or the mask must stay."""

    tokens: int | None = None
    """Video tokens: ``TokenLayout`` pads for FP8, SP or CP divisibility."""
    text: int | None = None
    """Text keys: FP8 pads one prompt's keys to a multiple of 16 rows (``dit.fit_text``)."""


def attend(core_attention: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           key_mask: torch.Tensor | Segments | None, real_keys: int | None) -> torch.Tensor:
    """The core attention over whole (padded) sequences. End-padded keys are cut to the real ones
    where the core attention prefers that to a mask (``cuts_padded_keys``): FA4 then runs
    unmasked, where a mask would send it to cuDNN (its masked backward is wrong on sm90), and
    FP8 pads most clips and every prompt. Padded query rows attend to the real keys either way
    and are dropped later."""
    if real_keys is not None and core_attention.cuts_padded_keys:
        return core_attention(q, k[:real_keys], v[:real_keys])
    return core_attention(q, k, v, key_mask)


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type


@dataclass
class CrossAttentionSubmodules:
    linear_q: ModuleSpec | type
    linear_kv: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type


def _heads_per_rank(config: MfMConfig) -> int:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if config.num_attention_heads % tp != 0:
        raise ValueError(
            f"num_attention_heads={config.num_attention_heads} is not divisible by "
            f"tensor_model_parallel_size={tp}"
        )
    return config.num_attention_heads // tp


def _row_parallel(spec, config: MfMConfig, size: int, bias: bool):
    return build_module(
        spec, size, size, config=config, init_method=xavier_uniform(size, size), bias=bias,
        input_is_parallel=True, skip_bias_add=False, is_expert=False,
    )


def norm_rope(norm: ShardedRMSNorm, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
              glue: BlockGlue) -> torch.Tensor:
    """QK-norm of x (S, B, heads, D), then RoPE unless ``rope`` is None: one glue region without
    TP; under TP the norm's all-reduce sits between the two."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        normed = norm(x.flatten(2)).view_as(x)
        return normed if rope is None else glue.rope(normed, *rope)
    if rope is None:
        return glue.rms_norm(x.flatten(2), norm.weight, norm.eps).view_as(x)
    return glue.norm_rope(x, norm.weight, norm.eps, *rope)


def _column_parallel(spec, config: MfMConfig, fan_in: int, out: int, fan_out: int, bias: bool):
    return build_module(
        spec, fan_in, out, config=config, init_method=xavier_uniform(fan_in, fan_out), bias=bias,
        gather_output=False, skip_bias_add=False, is_expert=False,
    )


class SelfAttention(MegatronModule):
    """3D full self-attention: fused qkv, whole-vector QK RMSNorm, 3D RoPE on q and k.

    Under context parallelism ``config.cp_comm_type`` picks the exchange: "a2a" swaps the token
    split for a head split around the core attention; "p2p" runs ring attention on the local
    tokens: Transformer Engine's own when the core attention can, else ``ring_attention``.
    """

    def __init__(self, config: MfMConfig, submodules: SelfAttentionSubmodules):
        super().__init__(config)
        dim, bias = config.hidden_size, config.attention_bias
        self.heads = _heads_per_rank(config)
        context_parallel = parallel_state.get_context_parallel_world_size() > 1
        self.all_to_all = context_parallel and config.cp_comm_type == "a2a"
        self.ring = context_parallel and config.cp_comm_type == "p2p"
        self.linear_qkv = _column_parallel(submodules.linear_qkv, config, dim, 3 * dim, dim, bias)
        self.q_norm = ShardedRMSNorm(config, dim)
        self.k_norm = ShardedRMSNorm(config, dim)
        self.core_attention = build_module(submodules.core_attention, config=config, cross_attention=False)
        self.linear_proj = _row_parallel(submodules.linear_proj, config, dim, bias)
        self.glue = block_glue(config.compile_glue)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | Segments | None = None,
        real_tokens: int | None = None,
    ) -> torch.Tensor:
        """x (S/cp/sp, B, D); key_mask (B, S) marks real tokens when the sequence is padded, or
        is a packed sequence's ``Segments`` over the whole padded sequence; ``real_tokens``: how
        many of a padded clip's tokens are real (they come first in every sample)."""
        qkv, _ = self.linear_qkv(x)  # (S/cp, B, 3*hidden/tp): this CP rank's tokens, SP gathered
        q, k, v = qkv.unflatten(-1, (self.heads, 3, -1)).unbind(dim=3)  # (S/cp, B, heads, D) each
        q, k = norm_rope(self.q_norm, q, rope, self.glue), norm_rope(self.k_norm, k, rope, self.glue)
        if self.ring and self.core_attention.runs_ring(q, key_mask):  # TE's fused ring
            out = self.core_attention(q, k, v)
        elif self.ring:  # (S/cp, B, heads*D): keys and values travel around the CP ring
            packed = isinstance(key_mask, Segments)
            masks = BlockMasks(key_mask.query[self.local_rows(q)], key_mask.key) if packed else None
            out = ring_attention(q, k, v, None if packed else key_mask, parallel_state.get_context_parallel_group(),
                                 self.core_attention.ring_kernels, masks)
        elif self.all_to_all:
            q, k, v = (sequence_to_heads(t) for t in (q, k, v))  # all tokens, heads/cp
            out = heads_to_sequence(attend(self.core_attention, q, k, v, key_mask, real_tokens), batch=x.shape[1])
        else:
            out = attend(self.core_attention, q, k, v, key_mask, real_tokens)
        out, _ = self.linear_proj(out)
        return out

    @staticmethod
    def local_rows(q: torch.Tensor) -> slice:
        """This CP rank's rows of the whole sequence (q holds them)."""
        rank = parallel_state.get_context_parallel_rank()
        return slice(rank * q.shape[0], (rank + 1) * q.shape[0])


class CrossAttention(MegatronModule):
    """Attention from video tokens to text tokens: RoPE on q only, key padding mask."""

    def __init__(self, config: MfMConfig, submodules: CrossAttentionSubmodules):
        super().__init__(config)
        dim, bias, text_dim = config.hidden_size, config.attention_bias, config.text_hidden_size
        self.heads = _heads_per_rank(config)
        self.linear_q = _column_parallel(submodules.linear_q, config, dim, dim, dim, bias)
        self.linear_kv = _column_parallel(
            submodules.linear_kv, without_sequence_parallel(config), text_dim, 2 * dim, dim, bias
        )
        self.q_norm = ShardedRMSNorm(config, dim)
        self.k_norm = ShardedRMSNorm(config, dim)
        self.core_attention = build_module(submodules.core_attention, config=config, cross_attention=True)
        self.linear_proj = _row_parallel(submodules.linear_proj, config, dim, bias)
        self.glue = block_glue(config.compile_glue)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | Segments | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        real_keys: int | None = None,
    ) -> torch.Tensor:
        """x (S/cp/sp, B, D), text (L, B, C_text); text_mask (B, L) True for real text tokens, or
        a packed sequence's ``Segments`` (this rank's rows against the packed text); ``real_keys``:
        how many of the text rows are real when only FP8's row padding is masked."""
        q, _ = self.linear_q(x)  # (S, B, hidden/tp)
        kv, _ = self.linear_kv(text)  # (L, B, 2*hidden/tp)
        k, v = kv.unflatten(-1, (self.heads, 2, -1)).unbind(dim=3)  # (L, B, heads, D) each
        q = norm_rope(self.q_norm, q.unflatten(-1, (self.heads, -1)), rope, self.glue)
        k = norm_rope(self.k_norm, k, None, self.glue)
        out, _ = self.linear_proj(attend(self.core_attention, q, k, v, text_mask, real_keys))
        return out
