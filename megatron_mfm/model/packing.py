"""Packed variable-length sequences: samples of several shapes in one token sequence.

A packed micro-batch hands the DiT a list of groups, each a (b, C, T, H, W) latent batch of one
shape; their samples' tokens are concatenated (group by group, sample by sample, each in t, h, w
order) into one sequence of batch 1, padded at the end for CP x SP (``TokenLayout``). Every token
carries its sample's index, its *segment*; the padding rows form one extra segment of their own.

- attention: query i attends key j only within one segment (``Segments``), so no sample sees
  another, and the padding sees only itself (no row is ever empty: kernels stay finite);
- text: each sample's real text tokens are concatenated with the sample's segment id, so
  cross-attention reads only the sample's own prompt (the padding segment gets one zero token);
- RoPE: each sample's tables over its own (t, h, w) grid, from position 0;
- adaLN: ``c`` is (samples, D); every token's modulation is its sample's row (zero for padding).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from einops import rearrange

from megatron_mfm.model.rope import rope_cos_sin
from megatron_mfm.parallel.context import TokenLayout, pad_rope


@dataclass(frozen=True)
class Segments:
    """Which queries may attend which keys: query i attends key j iff their segment ids match.

    ``cu_seqlens`` (int32, from 0) and ``max_seqlen`` describe the same segments for varlen
    kernels; they exist when both sides are sorted and hold the same segments (self-attention
    over the whole packed sequence)."""

    query: torch.Tensor
    """(S_q,) segment id of each query row."""
    key: torch.Tensor
    """(S_k,) segment id of each key row (-1: a key no query reads)."""
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None

    def mask(self) -> torch.Tensor:
        """(S_q, S_k) True where attention is allowed."""
        return self.query[:, None] == self.key[None, :]

    def chunk(self, index: int, chunks: int) -> torch.Tensor:
        """The key ids of the ``index``-th of ``chunks`` equal chunks (a CP rank's keys)."""
        size = self.key.shape[0] // chunks
        return self.key[index * size:(index + 1) * size]


@dataclass(frozen=True)
class PackedSequence:
    """The packed token sequence of one micro-batch: which sample every row belongs to."""

    groups: tuple[tuple[int, tuple[int, int, int]], ...]
    """(samples, token grid (t, h, w)) of each group, in packing order."""
    layout: TokenLayout
    """Padding of the whole sequence for CP x SP and this rank's CP chunk."""

    @property
    def samples(self) -> int:
        return sum(count for count, _ in self.groups)

    @property
    def sample_grids(self) -> list[tuple[int, int, int]]:
        """The token grid of every sample, in packing order."""
        return [grid for count, grid in self.groups for _ in range(count)]

    @property
    def sample_tokens(self) -> list[int]:
        return [t * h * w for t, h, w in self.sample_grids]

    @cached_property
    def segment_ids(self) -> torch.Tensor:
        """(padded,) the sample of every row of the padded sequence; padding rows: ``samples``."""
        ids = torch.repeat_interleave(torch.arange(self.samples), torch.tensor(self.sample_tokens))
        return F.pad(ids, (0, self.layout.padded - self.layout.tokens), value=self.samples)

    def self_attention(self, device: torch.device) -> Segments:
        """Segments of the whole padded sequence, both sides (all-to-all CP and no CP see all
        rows; the ring cuts the keys per rank)."""
        lengths = self.sample_tokens + ([self.layout.padded - self.layout.tokens] if self.padded_rows else [])
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        ids = self.segment_ids.to(device)
        return Segments(ids, ids, cu_seqlens, max(lengths))

    @property
    def padded_rows(self) -> bool:
        return self.layout.padded > self.layout.tokens

    def local_ids(self, device: torch.device) -> torch.Tensor:
        """(padded/cp,) segment ids of this CP rank's rows."""
        return self.segment_ids[self.layout.local].to(device)

    def rope(self, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's RoPE rows: every sample rotated over its own grid from position 0."""
        tables = [rope_cos_sin(grid, head_dim, theta, device) for grid in self.sample_grids]
        return pad_rope(torch.cat([cos for cos, _ in tables]), torch.cat([sin for _, sin in tables]), self.layout)

    def split_groups(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(tokens, 1, F) the real rows of the whole sequence -> one (t*h*w, b, F) per group."""
        sizes = [count * math.prod(grid) for count, grid in self.groups]
        return [rearrange(part, "(b s) 1 f -> s b f", b=count) for part, (count, _) in zip(tokens.split(sizes), self.groups)]


@dataclass(frozen=True)
class PackedText:
    """Every sample's real text tokens, concatenated: cross-attention keys of a packed sequence."""

    states: torch.Tensor
    """(L_total, 1, C_text)."""
    segment_ids: torch.Tensor
    """(L_total,) the sample of each text token; -1 on the rows padding L_total."""


def pack_text(text: torch.Tensor, text_mask: torch.Tensor | None, padding_segment: int | None,
              row_multiple: int) -> PackedText:
    """(n, L, C) text and (n, L) mask -> the real tokens of every sample in order, plus one zero
    token for the padding segment (``padding_segment``, when there is padding), padded to a
    multiple of ``row_multiple`` rows that no query reads."""
    samples, length, channels = text.shape
    keep = torch.ones(samples, length, dtype=torch.bool, device=text.device) if text_mask is None else text_mask.bool()
    states = text[keep]
    ids = torch.arange(samples, device=text.device)[:, None].expand(samples, length)[keep]
    if padding_segment is not None:
        states = torch.cat([states, text.new_zeros(1, channels)])
        ids = torch.cat([ids, ids.new_full((1,), padding_segment)])
    extra = -states.shape[0] % row_multiple
    states = F.pad(states, (0, 0, 0, extra))
    ids = F.pad(ids, (0, extra), value=-1)
    return PackedText(states[:, None], ids)


@dataclass(frozen=True)
class PackedAttention:
    """What one block needs to run a packed sequence (built once per forward)."""

    self_attention: Segments
    cross_attention: Segments
    modulation_index: torch.Tensor
    """(rows,) the row of ``c`` (padded with one zero row) each of this rank's block rows uses."""


class _SampleRows(torch.autograd.Function):
    """Per-sample values -> per-token rows, whose gradient sums each sample's rows in one GEMM.

    Autograd's own backward of ``values[index]`` is ``index_put_`` with accumulation, on CUDA a
    sort-based kernel that adds the duplicates of one index serially: a sample's thousands of
    tokens, 6 x hidden wide, in every block. A (rows, samples) membership matrix turns the sum
    into one deterministic matrix product."""

    @staticmethod
    def forward(ctx, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.samples = values.shape[0]
        return F.pad(values, (0, 0, 0, 1)).index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (index,) = ctx.saved_tensors
        membership = F.one_hot(index, ctx.samples + 1)[:, :ctx.samples].to(grad.dtype)  # padding: no sample
        return None, membership.T @ grad


def modulation_rows(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(n, F) per-sample values -> (rows, 1, F) per token; index ``n`` (padding) gets zeros."""
    return _SampleRows.apply(index, values)[:, None]
