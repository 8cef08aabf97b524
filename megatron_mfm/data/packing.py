"""Packed micro-batches (``data.packing``): a step's samples regrouped by tokens, not by shape.

Bucketed micro-batches hold samples of one shape, so a token budget is filled only as far as
whole samples of that bucket fit, and image and video micro-batches differ in cost. Packing takes
the samples of a step's micro-batches (this data-parallel rank's), sorts them by tokens and
places each, first fit, into the first pack with room under the budget (a sample larger than
the budget gets a pack of its own). A pack is one micro-batch: one ``MicroBatch`` part per shape,
which the DiT runs as one token sequence (``model/packing.py``). Which samples a step trains on
is unchanged, and so is the step's token-weighted loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mfm.data.batch import MicroBatch
from megatron_mfm.model.geometry import clip_tokens


@dataclass
class PackingConfig:
    """Packed variable-length micro-batches."""

    token_budget: int = 0
    """DiT tokens per packed micro-batch (0: off, micro-batches stay bucketed by shape)."""

    def __post_init__(self) -> None:
        if self.token_budget < 0:
            raise ValueError(f"data.packing.token_budget={self.token_budget} must be >= 0 (0: no packing)")


@dataclass
class PackedMicroBatch:
    """One packed micro-batch: its samples as one part per shape, in packing order."""

    parts: list[MicroBatch]

    @property
    def tasks(self) -> list[str]:
        return [task for part in self.parts for task in part.tasks]

    @property
    def sample_ids(self) -> torch.Tensor:
        return torch.cat([part.sample_ids for part in self.parts])


def sample_tokens(batch: MicroBatch) -> int:
    """DiT tokens of one sample of a (one-shape) micro-batch."""
    return clip_tokens(*batch.pixels.shape[2:])


def parts_of(batch: MicroBatch | PackedMicroBatch) -> list[MicroBatch]:
    """The one-shape micro-batches a micro-batch consists of."""
    return batch.parts if isinstance(batch, PackedMicroBatch) else [batch]


def take_rows(batch: MicroBatch, rows: list[int]) -> MicroBatch:
    """The micro-batch of these rows of ``batch``."""
    return MicroBatch(
        pixels=batch.pixels[rows], condition=batch.condition[rows], prompts=[batch.prompts[r] for r in rows],
        motion_score=batch.motion_score[rows], tasks=[batch.tasks[r] for r in rows],
        sample_ids=batch.sample_ids[rows], depth_to_estimate=[batch.depth_to_estimate[r] for r in rows],
        precomputed=None if batch.precomputed is None else [batch.precomputed[r] for r in rows],
    )


def concatenate(batches: list[MicroBatch]) -> MicroBatch:
    """Micro-batches of one shape as one."""
    if len(batches) == 1:
        return batches[0]
    precomputed = [b.precomputed for b in batches]
    return MicroBatch(
        pixels=torch.cat([b.pixels for b in batches]), condition=torch.cat([b.condition for b in batches]),
        prompts=[p for b in batches for p in b.prompts], motion_score=torch.cat([b.motion_score for b in batches]),
        tasks=[t for b in batches for t in b.tasks], sample_ids=torch.cat([b.sample_ids for b in batches]),
        depth_to_estimate=[d for b in batches for d in b.depth_to_estimate],
        precomputed=None if all(p is None for p in precomputed) else
        [item for b in batches for item in (b.precomputed or [None] * len(b.prompts))],
    )


def first_fit(tokens: list[int], budget: int) -> list[list[int]]:
    """Indices of ``tokens`` in bins of at most ``budget`` (first fit, largest first; ties in
    index order); an item over the budget gets a bin of its own."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        fitting = next((b for b, left in enumerate(room) if tokens[index] <= left), None)
        if fitting is None:
            bins.append([index])
            room.append(budget - tokens[index])
        else:
            bins[fitting].append(index)
            room[fitting] -= tokens[index]
    return bins


def pack_micro_batches(micro_batches: list[MicroBatch], token_budget: int) -> list[PackedMicroBatch]:
    """The samples of ``micro_batches`` (each of one shape) regrouped into packs of at most
    ``token_budget`` tokens; in a pack, samples of one shape form one part."""
    samples = [(m, row) for m, batch in enumerate(micro_batches) for row in range(len(batch.prompts))]
    tokens = [sample_tokens(micro_batches[m]) for m, _ in samples]
    packs = []
    for members in first_fit(tokens, token_budget):
        by_shape: dict[tuple, list[MicroBatch]] = {}
        for m, row in (samples[i] for i in sorted(members)):
            by_shape.setdefault(tuple(micro_batches[m].pixels.shape[1:]), []).append(take_rows(micro_batches[m], [row]))
        packs.append(PackedMicroBatch([concatenate(group) for group in by_shape.values()]))
    return packs
