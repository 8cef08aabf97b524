"""Ring (p2p) context-parallel attention: the alternative to the all-to-all head exchange.

Each CP rank keeps its query chunk with all of its (TP-local) heads. The key/value chunks travel
around the CP ring with point-to-point sends; every rank attends to one chunk per step with a
fused kernel that also returns the softmax log-sum-exp (LSE), and merges the partial results with
the LSE rule in fp32, so the result is exact softmax attention over the whole sequence. The next
chunk's transfer is posted before the current chunk is computed, so communication overlaps
compute. Backward runs the ring again: the fused backward kernel recomputes each block's
probabilities from the saved final output and LSE, and the dK/dV accumulators travel with their
chunk until they return to its owner. Only the local chunks, the output and the LSE are kept for
backward: memory is O(local chunk), not O(sequence).

Unlike all-to-all it needs only heads % tp == 0 (heads are not split across CP ranks) and its
traffic is neighbour-to-neighbour, which suits CP groups that span nodes.

The block kernels are pluggable (``BlockKernels``): torch's aten kernels by default, FA4's with
``model.attention_backend=fa4`` (``model/attention_backends/fa4.py``).

Packed sequences (``BlockMasks``): each block is masked to the pairs of one segment on the CPU
kernel; a block no query may read is skipped.

Padding: the sequence is padded at its end (``TokenLayout``), so instead of masking, each key
chunk is cut to its real tokens (a chunk of padding only is skipped). The fused kernels then run
without masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

_KV_TAG, _DKV_TAG = 1, 2
_EFFICIENT_ROWS = 32
"""The memory-efficient CUDA kernel pads its LSE rows to a multiple of this."""


@dataclass(frozen=True)
class Ring:
    """This rank's place in the CP ring (global ranks of its neighbours)."""

    group: dist.ProcessGroup
    size: int
    rank: int
    next_rank: int
    prev_rank: int

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> Ring:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return cls(
            group=group,
            size=size,
            rank=rank,
            next_rank=dist.get_global_rank(group, (rank + 1) % size),
            prev_rank=dist.get_global_rank(group, (rank - 1) % size),
        )

    def source_of_step(self, step: int) -> int:
        """Group rank whose key/value chunk this rank holds at ``step`` (chunks move to next)."""
        return (self.rank - step) % self.size

    def pass_on(self, tensor: torch.Tensor, tag: int) -> tuple[torch.Tensor, list]:
        """Post the send of ``tensor`` to the next rank and the receive of the previous rank's
        same-shaped tensor; returns the receive buffer and the pending requests. The tag keeps
        key/value chunks and gradient accumulators, in flight together, apart (gloo matches on
        it; NCCL matches by order, which is the same on every rank)."""
        received = torch.empty_like(tensor)
        requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, self.next_rank, self.group, tag),
            dist.P2POp(dist.irecv, received, self.prev_rank, self.group, tag),
        ])
        return received, requests


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _attend(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention of one block, (B, H, S, D) -> (out in q's dtype, LSE (B, H, Sq) fp32).
    The public SDPA does not return the LSE the merge needs, hence the aten kernels behind it."""
    aten = torch.ops.aten
    if not q.is_cuda:
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    if q.dtype in (torch.float16, torch.bfloat16):
        out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out, lse
    out, lse, *_ = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return out, lse[..., : q.shape[2]]


def _attend_backward(dout, q, k, v, out, lse, scale: float) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of one block, its probabilities recomputed from the FINAL out and LSE (so the
    block gradients of all chunks add up to the gradient of the whole attention)."""
    aten = torch.ops.aten
    if not q.is_cuda:
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, False,
                                                                        scale=scale)
    no_dropout_rng = q.new_empty(0, dtype=torch.int64)
    if q.dtype in (torch.float16, torch.bfloat16):
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, False, no_dropout_rng, no_dropout_rng,
            scale=scale)
    lse = F.pad(lse, (0, -q.shape[2] % _EFFICIENT_ROWS))
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, no_dropout_rng, no_dropout_rng, 0.0, [True, True, True, False], False,
        scale=scale)
    return dq, dk, dv


@dataclass(frozen=True)
class BlockKernels:
    """The fused kernels the ring runs on each block, all in (B, heads, S, D):
    ``attend(q, k, v, scale) -> (out, LSE (B, heads, S) fp32)`` and
    ``attend_backward(dout, q, k, v, out, lse, scale) -> (dq, dk, dv)``, the latter recomputing the
    block's probabilities from the given (final) out and LSE."""

    attend: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    attend_backward: Callable[..., tuple[torch.Tensor, ...]]


ATEN_KERNELS = BlockKernels(attend=_attend, attend_backward=_attend_backward)


@dataclass(frozen=True)
class BlockMasks:
    """A packed sequence's segments under the ring: this rank's query ids and every key's id;
    block (query chunk, key chunk of rank r) allows the pairs of equal ids."""

    query: torch.Tensor
    """(S/cp,) segment ids of this rank's queries."""
    key: torch.Tensor
    """(S,) segment ids of the whole sequence's keys."""

    def allowed(self, source: int, size: int) -> torch.Tensor | None:
        """(S/cp, S/cp) True where this rank's queries may read ``source``'s keys; None when
        none may (the block is skipped)."""
        chunk = self.key.shape[0] // size
        allowed = self.query[:, None] == self.key[source * chunk:(source + 1) * chunk][None, :]
        return allowed if allowed.any() else None


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The CPU kernel's additive mask (0 / -inf, in the inputs' dtype), (1, 1, S_q, S_k)."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))[None, None]


def _attend_masked(q, k, v, scale: float, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One masked block on the CPU; rows that may read no key of it get LSE -inf (the kernel
    gives them 0), so the merge gives them no weight."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=_bias(allowed, q.dtype), scale=scale)
    return out, lse.masked_fill(~allowed.any(-1), float("-inf"))


def _attend_masked_backward(dout, q, k, v, out, lse, scale: float, allowed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, attn_mask=_bias(allowed, q.dtype), scale=scale)


def _merge(out, lse, block_out, block_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge (fp32) of two partial results over disjoint key sets. Rows that have
    seen no real key yet carry LSE -inf; they are kept finite (weight 0), not NaN."""
    merged = torch.logaddexp(lse, block_lse)
    safe = merged.masked_fill(merged == float("-inf"), 0.0)[..., None]
    out = out * torch.exp(lse[..., None] - safe) + block_out.float() * torch.exp(block_lse[..., None] - safe)
    return out, merged


def real_keys_per_chunk(key_padding_mask: torch.Tensor | None, size: int, chunk: int) -> list[int]:
    """How many leading keys of each rank's chunk are real tokens.

    The mask must be end-of-sequence padding, the same for every sample (what ``TokenLayout``
    makes); anything else is refused. Reading the count is one host sync per call.
    """
    if key_padding_mask is None:
        return [chunk] * size
    if key_padding_mask.shape[-1] != size * chunk:
        raise ValueError(
            f"ring_attention: key_padding_mask covers {key_padding_mask.shape[-1]} keys, but "
            f"{size} CP ranks x {chunk} local tokens = {size * chunk}"
        )
    real = key_padding_mask[0].sum()
    end_padding = torch.arange(size * chunk, device=key_padding_mask.device) < real
    is_end_padding, real = torch.stack([(key_padding_mask == end_padding).all(), real]).tolist()
    if not is_end_padding:
        raise ValueError(
            "ring_attention: key_padding_mask must pad the end of the sequence, equally for every "
            "sample (the TokenLayout padding)"
        )
    return [min(max(real - rank * chunk, 0), chunk) for rank in range(size)]


def _heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """(S, B, H, D) -> contiguous (B, H, S, D), the kernels' layout."""
    return [t.permute(1, 2, 0, 3).contiguous() for t in tensors]


class _RingAttention(torch.autograd.Function):
    """Inputs (S/cp, B, heads, D) per rank; output (S/cp, B, heads*D)."""

    @staticmethod
    def forward(ctx, query, key, value, real_keys: list[int], group, kernels: BlockKernels,
                masks: BlockMasks | None):
        ring = Ring.of(group)
        scale = 1.0 / math.sqrt(query.shape[-1])
        q, k, v = _heads_first(query, key, value)
        kv = torch.stack([k, v])  # (2, B, H, S/cp, D): one message per step
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
        for step in range(ring.size):
            if step + 1 < ring.size:  # overlap: the next chunk is in flight during this compute
                next_kv, requests = ring.pass_on(kv, _KV_TAG)
            source = ring.source_of_step(step)
            real = real_keys[source]
            if masks is not None and (allowed := masks.allowed(source, ring.size)) is not None:
                out, lse = _merge(out, lse, *_attend_masked(q, kv[0], kv[1], scale, allowed))
            elif masks is None and real:  # a chunk of padding only adds nothing
                block_out, block_lse = kernels.attend(q, kv[0, :, :, :real], kv[1, :, :, :real], scale)
                out, lse = _merge(out, lse, block_out, block_lse)
            if step + 1 < ring.size:
                _wait(requests)
                kv = next_kv
        out = out.to(query.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.real_keys, ctx.group, ctx.scale, ctx.kernels, ctx.masks = real_keys, group, scale, kernels, masks
        return out.permute(2, 0, 1, 3).flatten(2)

    @staticmethod
    def backward(ctx, grad_output):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = Ring.of(ctx.group), ctx.scale
        batch, heads, chunk, dim = q.shape
        (dout,) = _heads_first(grad_output.reshape(chunk, batch, heads, dim))
        kv = torch.stack([k, v])
        dq = torch.zeros_like(q, dtype=torch.float32)
        dkv_in_flight = None  # accumulator of the chunk arriving now, from the previous rank
        for step in range(ring.size):
            if step + 1 < ring.size:
                next_kv, kv_requests = ring.pass_on(kv, _KV_TAG)
            source = ring.source_of_step(step)
            real = ctx.real_keys[source]
            dkv = torch.zeros_like(kv, dtype=torch.float32)  # this rank's share of the held chunk's dK/dV
            if ctx.masks is not None and (allowed := ctx.masks.allowed(source, ring.size)) is not None:
                dq_block, dk, dv = _attend_masked_backward(dout, q, kv[0], kv[1], out, lse, scale, allowed)
                dq += dq_block
                dkv[0], dkv[1] = dk, dv
            elif ctx.masks is None and real:
                dq_block, dk, dv = ctx.kernels.attend_backward(dout, q, kv[0, :, :, :real], kv[1, :, :, :real],
                                                               out, lse, scale)
                dq += dq_block
                dkv[0, :, :, :real] = dk
                dkv[1, :, :, :real] = dv
            if dkv_in_flight is not None:  # add the other ranks' shares of this chunk
                received, dkv_requests = dkv_in_flight
                _wait(dkv_requests)
                dkv += received
            dkv_in_flight = ring.pass_on(dkv, _DKV_TAG) if ring.size > 1 else None  # on to the next holder
            if step + 1 < ring.size:
                _wait(kv_requests)
                kv = next_kv
        if dkv_in_flight is not None:  # the last pass brings each chunk's dK/dV home
            received, dkv_requests = dkv_in_flight
            _wait(dkv_requests)
            dkv = received
        dq, dkey, dvalue = (g.permute(2, 0, 1, 3).to(q.dtype) for g in (dq, dkv[0], dkv[1]))
        return dq, dkey, dvalue, None, None, None, None


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    group: dist.ProcessGroup,
    kernels: BlockKernels | None = None,
    masks: BlockMasks | None = None,
) -> torch.Tensor:
    """Bidirectional attention of this rank's queries over the keys of every rank in ``group``.

    Args:
        query, key, value: this rank's contiguous token chunk, (S/cp, B, heads, D); rank i of the
            group holds tokens [i*S/cp, (i+1)*S/cp).
        key_padding_mask: (B, S) of the whole sequence, True for real tokens, padding at the end
            (see ``real_keys_per_chunk``); None: no padding.
        group: the CP group forming the ring.
        kernels: the per-block fused kernels (None: torch's aten kernels).
        masks: a packed sequence's segments (``key_padding_mask`` is then None): each block runs
            torch's CPU kernel with its block mask; refused on a GPU, whose fused ring kernels
            here take no mask (use all-to-all CP there).

    Returns:
        (S/cp, B, heads*D) in the query dtype.
    """
    if masks is not None and query.is_cuda:
        raise ValueError("ring attention over a packed sequence (data.packing) runs only on the CPU: its GPU "
                         "kernels take no block mask; use parallel.cp_comm_type=a2a")
    real_keys = real_keys_per_chunk(key_padding_mask, dist.get_world_size(group), query.shape[0])
    return _RingAttention.apply(query, key, value, real_keys, group, kernels or ATEN_KERNELS, masks)
