"""Micro-batches for one optimizer step, a pure function of (seed, consumed samples, DP rank).

Sample ``i`` of the run always gets the same clip, task, noise and timestep, whatever the
parallel layout: a global batch is cut into micro-batch slots, slot ``s`` holding samples
``s*mbs .. s*mbs+mbs-1``; DP rank ``r`` takes slots ``base + m*dp + r``. The only state is the
number of consumed samples, saved in checkpoints, so a resumed run sees exactly the samples it
would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mfm.data.shards.precomputed import Precomputed
from megatron_mfm.data.synthetic import SyntheticVideoDataset
from megatron_mfm.tasks.builders import TaskSample
from megatron_mfm.tasks.mixture import TaskMixture


@dataclass
class MicroBatch:
    pixels: torch.Tensor
    """(B, 3, F, H, W) target clips in [-1, 1]."""
    condition: torch.Tensor
    """(B, 5, F, H, W) task conditions."""
    prompts: list[str]
    motion_score: torch.Tensor
    """(B,)"""
    tasks: list[str]
    sample_ids: torch.Tensor
    """(B,) global sample indices: seed the per-sample noise and timestep."""
    depth_to_estimate: list[list[int]]
    """Per sample, the frames whose depth channel the depth model fills in (see TaskSample)."""
    precomputed: list[Precomputed] | None = None
    """Per sample, its sidecar latents and text states (data.shards.precomputed), or None."""


def collate(samples: list[TaskSample], sample_ids: list[int]) -> MicroBatch:
    """Stack task samples of one shape into a micro-batch."""
    return MicroBatch(
        pixels=torch.stack([s.pixels for s in samples]),
        condition=torch.stack([s.condition for s in samples]),
        prompts=[s.prompt for s in samples],
        motion_score=torch.tensor([s.motion_score for s in samples]),
        tasks=[s.task for s in samples],
        sample_ids=torch.tensor(sample_ids),
        depth_to_estimate=[s.depth_to_estimate for s in samples],
    )


def sample_generator(seed: int, sample_id: int, stream: int) -> torch.Generator:
    """Independent deterministic generator per (sample, purpose)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + sample_id) * 16 + stream)


class SyntheticLoader:
    """This DP rank's micro-batches of each global batch, from the synthetic dataset."""

    skipped_samples = 0  # rendered samples never fail

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
        kind = sample_generator(self.seed, slot, stream=0)
        is_image = torch.rand(1, generator=kind).item() < self.dataset.config.image_fraction
        samples = []
        ids = list(range(slot * self.mbs, (slot + 1) * self.mbs))
        for sample_id in ids:
            clip = self.dataset.clip(sample_id, is_image)
            samples.append(self.mixture.sample(clip, sample_generator(self.seed, sample_id, stream=1)))
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
