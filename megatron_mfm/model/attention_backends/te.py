"""Core attention through Transformer Engine's fused attention (cuDNN): ``cudnn`` in the TE spec."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_mfm.model.attention_backends.sdpa import SDPACoreAttention
from megatron_mfm.model.packing import Segments


class TECoreAttention(torch.nn.Module):
    """Transformer Engine's fused attention in sbhd layout; (S, B, heads, D) in, (S, B, heads*D) out.

    Under ring CP (``cp_comm_type="p2p"``) self-attention is TE's own ring: it takes this rank's
    tokens and passes keys and values around the CP group itself, overlapping the exchange with
    the fused kernels. TE's ring takes no padding mask in sbhd, nor fp32: such clips go through
    the torch ring (``runs_ring`` is False for them).
    """

    ring_kernels = None
    """Block kernels when the torch ring runs instead of TE's (None: ``ring_attention``'s aten defaults)."""

    cuts_padded_keys = False
    """End-padded keys keep their mask (``attention.attend``): TE's fused kernels take it at full
    speed."""

    def __init__(self, config, cross_attention: bool):
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
        # packed cross-attention: each sample's queries read only its own text (a block mask)
        self.segment_attention = SDPACoreAttention(config, True, kernel="cudnn") if cross_attention else None

    def packed(self, query, key, value, segments: Segments) -> torch.Tensor:
        """A packed sequence (batch 1): self-attention in TE's THD format over the segments'
        ``cu_seqlens``; cross-attention through SDPA with the block mask."""
        if self.segment_attention is not None:
            return self.segment_attention(query, key, value, segments)
        out = self.attention(query[:, 0], key[:, 0], value[:, 0], qkv_format="thd", attn_mask_type="padding",
                             cu_seqlens_q=segments.cu_seqlens, cu_seqlens_kv=segments.cu_seqlens,
                             max_seqlen_q=segments.max_seqlen, max_seqlen_kv=segments.max_seqlen)
        return out.reshape(query.shape[0], 1, -1)

    def runs_ring(self, query: torch.Tensor, key_padding_mask: torch.Tensor | None) -> bool:
        """TE's ring needs an unpadded clip, an even local length and 16-bit inputs."""
        return (self.ring and key_padding_mask is None and query.shape[0] % 2 == 0
                and query.dtype in (torch.bfloat16, torch.float16))

    def forward(self, query, key, value, key_padding_mask: torch.Tensor | Segments | None = None):
        if isinstance(key_padding_mask, Segments):
            return self.packed(query, key, value, key_padding_mask)
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
