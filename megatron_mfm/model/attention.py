"""Self- and cross-attention of the MfM block, and core attentions (SDPA, Transformer Engine).

Tensors are megatron-shaped: tokens (S, B, hidden). Under TP each rank owns a contiguous slice of
heads; the fused projections are laid out per head ([q_h, k_h, v_h] for ``linear_qkv``,
[k_h, v_h] for ``linear_kv``) so a rank's shard is exactly its heads' rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_mfm.model.config import MfMConfig
from megatron_mfm.model.glue import BlockGlue, block_glue
from megatron_mfm.model.norms import ShardedRMSNorm
from megatron_mfm.parallel.context import heads_to_sequence, sequence_to_heads
from megatron_mfm.parallel.ring_attention import ring_attention


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


class SDPACoreAttention(torch.nn.Module):
    """Bidirectional attention through ``F.scaled_dot_product_attention`` (no score matrix is
    materialised by the fused backends). Inputs (S, B, heads, D) -> output (S, B, heads*D). On a
    GPU each shape runs on the backend timed fastest for it (``fastest_sdpa_backend``)."""

    def __init__(self, config: MfMConfig, cross_attention: bool):
        super().__init__()

    def runs_ring(self, query: torch.Tensor, key_padding_mask: torch.Tensor | None) -> bool:
        """SDPA sees only local tokens: ring CP goes through ``ring_attention``."""
        return False

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (B, heads, S, D)
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        # A traced graph (torch.export) has symbolic shapes to time nothing on: the runtime picks.
        if q.is_cuda and not torch.compiler.is_compiling():
            backend = fastest_sdpa_backend(tuple(q.shape), tuple(k.shape), q.dtype, q.device, mask is not None)
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # torch's choice: on the CPU a timed choice would make runs differ in the last bits
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.permute(2, 0, 1, 3).flatten(2)


GPU_SDPA_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


@functools.lru_cache(maxsize=64)
def fastest_sdpa_backend(q_shape: tuple, kv_shape: tuple, dtype: torch.dtype, device: torch.device,
                         masked: bool) -> SDPBackend:
    """The SDPA backend that runs these shapes fastest on this GPU, forward + backward, timed once
    per shape on random inputs (one choice whatever the grad mode, so a recomputed forward
    repeats the original exactly). torch's own pick varies between runs and versions; at
    MfM-2B's self-attention on an H100 flash is 1.47x slower than cuDNN."""
    generator = torch.Generator(device).manual_seed(0)  # leaves the training's random streams alone

    def normal(shape: tuple, requires_grad: bool = False) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_(requires_grad)

    q, k, v = normal(q_shape, True), normal(kv_shape, True), normal(kv_shape, True)
    mask = torch.ones(kv_shape[0], 1, 1, kv_shape[2], device=device, dtype=torch.bool) if masked else None
    grad = normal(q_shape)

    def step() -> None:
        with torch.enable_grad():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)

    timings = {}
    for backend in GPU_SDPA_BACKENDS:
        try:
            with sdpa_kernel(backend):
                step()  # warm-up, and raises when the backend does not take these inputs
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(3):
                    step()
                end.record()
                torch.cuda.synchronize()
        except RuntimeError:
            continue
        timings[backend] = start.elapsed_time(end)
    return min(timings, key=timings.get) if timings else SDPBackend.MATH


class TECoreAttention(torch.nn.Module):
    """Transformer Engine's fused attention (cuDNN / flash) in sbhd layout, same interface.

    Under ring CP (``cp_comm_type="p2p"``) self-attention is TE's own ring: it takes this rank's
    tokens and passes keys and values around the CP group itself, overlapping the exchange with
    the fused kernels. TE's ring takes no padding mask in sbhd, nor fp32: such clips go through
    the torch ring (``runs_ring`` is False for them).
    """

    def __init__(self, config: MfMConfig, cross_attention: bool):
        super().__init__()
        import transformer_engine.pytorch as te

        cp_size = parallel_state.get_context_parallel_world_size()
        # Self-attention runs on heads / CP after the all-to-all; cross-attention, and
        # self-attention under ring CP, on all local heads.
        heads_split_over_cp = not cross_attention and config.cp_comm_type == "a2a"
        self.cross_attention = cross_attention
        self.ring = not cross_attention and config.cp_comm_type == "p2p" and cp_size > 1
        ring = {}
        if self.ring:
            ring = dict(cp_group=parallel_state.get_context_parallel_group(),
                        cp_global_ranks=parallel_state.get_context_parallel_global_ranks(),
                        cp_stream=torch.cuda.Stream(), cp_comm_type="p2p")
        self.attention = te.DotProductAttention(
            num_attention_heads=config.num_attention_heads // (cp_size if heads_split_over_cp else 1),
            kv_channels=config.kv_channels,
            attention_dropout=0.0,
            qkv_format="sbhd",
            attn_mask_type="padding",  # per call: no_mask unless keys are padded
            attention_type="cross" if cross_attention else "self",
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
            tp_group=parallel_state.get_tensor_model_parallel_group(check_initialized=False),
            **ring,
        )

    def runs_ring(self, query: torch.Tensor, key_padding_mask: torch.Tensor | None) -> bool:
        """TE's ring needs an unpadded clip, an even local length and 16-bit inputs."""
        return (self.ring and key_padding_mask is None and query.shape[0] % 2 == 0
                and query.dtype in (torch.bfloat16, torch.float16))

    def forward(self, query, key, value, key_padding_mask=None):
        if key_padding_mask is None:
            out = self.attention(query, key, value, attn_mask_type="no_mask")
        else:
            # TE masks where True. Cross-attention: every video token queries (padding rows are
            # dropped by the loss), keys are masked. Self-attention takes one mask for both:
            # padded tokens (at the end) neither query nor are attended to.
            key_mask = ~key_padding_mask[:, None, None, :]
            if self.cross_attention:
                q_mask = torch.zeros(query.shape[1], 1, 1, query.shape[0], dtype=torch.bool, device=query.device)
                key_mask = (q_mask, key_mask)
            out = self.attention(query, key, value, attention_mask=key_mask, attn_mask_type="padding")
        return out.flatten(2) if out.dim() == 4 else out


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
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (S/cp/sp, B, D); key_mask (B, S) marks real tokens when the sequence is padded."""
        qkv, _ = self.linear_qkv(x)  # (S/cp, B, 3*hidden/tp): this CP rank's tokens, SP gathered
        q, k, v = qkv.unflatten(-1, (self.heads, 3, -1)).unbind(dim=3)  # (S/cp, B, heads, D) each
        q, k = norm_rope(self.q_norm, q, rope, self.glue), norm_rope(self.k_norm, k, rope, self.glue)
        if self.ring and self.core_attention.runs_ring(q, key_mask):  # TE's fused ring
            out = self.core_attention(q, k, v)
        elif self.ring:  # (S/cp, B, heads*D): keys and values travel around the CP ring
            out = ring_attention(q, k, v, key_mask, parallel_state.get_context_parallel_group())
        elif self.all_to_all:
            q, k, v = (sequence_to_heads(t) for t in (q, k, v))  # all tokens, heads/cp
            out = heads_to_sequence(self.core_attention(q, k, v, key_mask), batch=x.shape[1])
        else:
            out = self.core_attention(q, k, v, key_mask)
        out, _ = self.linear_proj(out)
        return out


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
        text_mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        q, _ = self.linear_q(x)  # (S, B, hidden/tp)
        kv, _ = self.linear_kv(text)  # (L, B, 2*hidden/tp)
        k, v = kv.unflatten(-1, (self.heads, 2, -1)).unbind(dim=3)  # (L, B, heads, D) each
        q = norm_rope(self.q_norm, q.unflatten(-1, (self.heads, -1)), rope, self.glue)
        k = norm_rope(self.k_norm, k, None, self.glue)
        out, _ = self.linear_proj(self.core_attention(q, k, v, text_mask))
        return out
