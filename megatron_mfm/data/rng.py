"""The random streams of a run, the one place their ids live.

Every random choice about a sample (its task, noise, timestep, VAE sample) comes from a
generator seeded by (run seed, sample id, stream), so a sample's numbers do not depend on the
parallel layout, the worker that built it, or which other samples share its micro-batch.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Stream(IntEnum):
    """What a per-sample generator is for."""

    MICRO_BATCH_KIND = 0
    """Synthetic data: whether a micro-batch slot holds images or videos (keyed by the slot)."""
    TASK = 1
    """The task and its condition (masks, degradations, text and depth dropout)."""
    NOISE = 2
    """The flow-matching noise."""
    SIGMA = 3
    """The flow-matching timestep."""
    LATENT = 4
    """The VAE's posterior sample."""


STREAMS_PER_SAMPLE = 16
"""Room kept per sample id for streams (ids below this never collide across samples)."""


def sample_generator(seed: int, sample_id: int, stream: Stream) -> torch.Generator:
    """The independent deterministic generator of one (sample, purpose)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + sample_id) * STREAMS_PER_SAMPLE + stream)


def sample_generators(seed: int, sample_ids: list[int], stream: Stream) -> list[torch.Generator]:
    """``sample_generator`` of each of ``sample_ids`` (a list: a tensor's ids cost an op each)."""
    return [sample_generator(seed, sample_id, stream) for sample_id in sample_ids]


def keyed_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator for a run-level choice keyed by integers (epoch, shuffle window...)."""
    value = seed
    for key in keys:
        value = value * 1_000_003 + key
    return torch.Generator().manual_seed(value % (2**63))
