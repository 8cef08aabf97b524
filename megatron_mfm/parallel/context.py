"""Context parallelism for the video tokens (all-to-all, "Ulysses" style).

The token sequence of a clip is padded to a multiple of CP x SP and split into contiguous
chunks, one per CP rank (then per TP rank under SP). Everything in a block is token-local except
self-attention: there an all-to-all turns (S/cp tokens, all local heads) into (all S tokens,
heads/cp), attention runs over the whole sequence with the padding masked out of the keys, and a
second all-to-all brings the result back. Cross-attention keys (the 77 text tokens) are never
split. The ring (p2p) alternative, selected by ``cp_comm_type="p2p"``, is ``ring_attention.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import all_to_all_hp2sp, all_to_all_sp2hp


@dataclass(frozen=True)
class TokenLayout:
    """Where this rank's tokens sit in one clip's padded token sequence."""

    tokens: int
    """Real tokens of the clip (t * h * w)."""
    padded: int
    """Tokens after padding to a multiple of CP x SP."""
    cp_size: int
    cp_rank: int

    @property
    def local(self) -> slice:
        """This CP rank's rows of the padded sequence."""
        size = self.padded // self.cp_size
        return slice(self.cp_rank * size, (self.cp_rank + 1) * size)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero rows appended along dim 0 up to ``padded``."""
        extra = self.padded - self.tokens
        if extra == 0:
            return x
        return torch.cat([x, x.new_zeros(extra, *x.shape[1:])])

    def key_padding_mask(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """(B, padded) True for real tokens; None when nothing is padded."""
        if self.padded == self.tokens:
            return None
        mask = torch.zeros(batch, self.padded, dtype=torch.bool, device=device)
        mask[:, : self.tokens] = True
        return mask

    def local_valid_rows(self, device: torch.device) -> torch.Tensor:
        """(padded/cp,) True where this rank's rows are real tokens."""
        return torch.arange(self.padded, device=device)[self.local] < self.tokens


def token_layout(tokens: int, sequence_parallel_size: int = 1, row_multiple: int = 1) -> TokenLayout:
    """Pad to a multiple of CP x SP (x ``row_multiple`` rows per CP rank, for FP8 GEMMs)."""
    cp = parallel_state.get_context_parallel_world_size()
    multiple = cp * math.lcm(sequence_parallel_size, row_multiple)
    return TokenLayout(
        tokens=tokens,
        padded=-(-tokens // multiple) * multiple,
        cp_size=cp,
        cp_rank=parallel_state.get_context_parallel_rank(),
    )


def scatter_tokens(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(S, B, D) -> this CP rank's padded chunk.

    A plain slice: its gradient is this rank's share only. Every CP rank computes the embeddings
    of the whole clip, but with megatron's loss scaling (x CP size) and DDP's averaging over
    DP x CP, gradients must be per-rank shares, as everywhere after the split.
    """
    return layout.pad(x)[layout.local]


class _GatherTokens(torch.autograd.Function):
    """Every CP rank's padded chunk -> the whole padded sequence on every rank; backward keeps
    this rank's rows of the gradient. Each rank computes the same loss on the whole sequence, so
    the gradient it keeps is exactly its tokens' share, as after ``scatter_tokens``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        ctx.local = layout.local
        chunks = [torch.empty_like(x) for _ in range(layout.cp_size)]
        dist.all_gather(chunks, x.contiguous(), group=parallel_state.get_context_parallel_group())
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[ctx.local].contiguous(), None


def gather_tokens(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(S_pad/cp, ...) this rank's chunk -> (S, ...) the clip's real tokens, on every CP rank."""
    if layout.cp_size > 1:
        x = _GatherTokens.apply(x, layout)
    return x[: layout.tokens]


def sequence_to_heads(x: torch.Tensor) -> torch.Tensor:
    """(S/cp, B, heads, D) -> (S, B, heads/cp, D) over the CP group."""
    s, b, heads, d = x.shape
    cp = parallel_state.get_context_parallel_world_size()
    out = all_to_all_sp2hp(x.reshape(s * b, heads * d), group=parallel_state.get_context_parallel_group())
    return out.view(cp * s, b, heads // cp, d)


def heads_to_sequence(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(S, B, heads/cp * D) -> (S/cp, B, heads * D) over the CP group."""
    out = all_to_all_hp2sp(x.reshape(-1, x.shape[-1]), group=parallel_state.get_context_parallel_group())
    return out.view(-1, batch, out.shape[-1])


def pad_rope(cos: torch.Tensor, sin: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for this rank's rows (padding rows rotate by 0)."""
    extra = layout.padded - layout.tokens
    cos, sin = F.pad(cos, (0, 0, 0, extra), value=1.0), F.pad(sin, (0, 0, 0, extra))
    return cos[layout.local], sin[layout.local]
