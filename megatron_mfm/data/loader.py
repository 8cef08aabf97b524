"""Micro-batches for one optimizer step, a pure function of (seed, consumed samples, DP rank).

Sample ``i`` of the run always gets the same clip, task, noise and timestep, whatever the
parallel layout: a global batch is cut into micro-batch slots, slot ``s`` holding samples
``s*mbs .. s*mbs+mbs-1``; DP rank ``r`` takes slots ``base + m*dp + r``. The only state is the
number of consumed samples, saved in checkpoints, so a resumed run sees exactly the samples it
would have seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from megatron_mfm.data.batch import MicroBatch, collate
from megatron_mfm.data.rng import Stream, sample_generator
from megatron_mfm.data.synthetic import SyntheticVideoDataset
from megatron_mfm.tasks.mixture import TaskMixture


class SyntheticLoader:
    """This DP rank's micro-batches of each global batch, from the synthetic dataset."""

    skipped_samples = 0  # rendered samples never fail
    sidecar_misses: Mapping[str, int] = MappingProxyType({})  # and have no sidecars

    def __init__(self, dataset: SyntheticVideoDataset, mixture: TaskMixture, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch size must be a multiple of micro batch size x DP size")
        self.dataset, self.mixture = dataset, mixture
        self.mbs, self.gbs = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_samples = 0

    @property
    def num_microbatches(self) -> int:
        return self.gbs // (self.mbs * self.dp_size)

    def micro_batch(self, slot: int) -> MicroBatch:
        """The micro-batch of global slot ``slot`` (all images or all videos)."""
        kind = sample_generator(self.seed, slot, Stream.MICRO_BATCH_KIND)
        is_image = torch.rand(1, generator=kind).item() < self.dataset.config.image_fraction
        samples = []
        ids = list(range(slot * self.mbs, (slot + 1) * self.mbs))
        for sample_id in ids:
            clip = self.dataset.clip(sample_id, is_image)
            samples.append(self.mixture.sample(clip, sample_generator(self.seed, sample_id, Stream.TASK)))
        return collate(samples, ids)

    def next_global_batch(self) -> list[MicroBatch]:
        """This rank's micro-batches for the next step; advances the consumed-sample count."""
        base = self.consumed_samples // self.mbs
        batches = [self.micro_batch(base + m * self.dp_size + self.dp_rank) for m in range(self.num_microbatches)]
        self.consumed_samples += self.gbs
        return batches

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
