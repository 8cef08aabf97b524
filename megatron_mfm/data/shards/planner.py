"""Which samples form which micro-batch of which step: a deterministic plan from metadata.

Every rank runs the same planner (it reads only the catalog), so every rank knows the whole
step: micro-batch ``j`` of a step goes to data-parallel rank ``j % dp``, and ranks of one
TP/CP/PP group (same DP rank) get the same micro-batches. The epoch order is a seeded
permutation of shards followed by a shuffle inside windows of ``shuffle_window`` samples (a
shuffle buffer whose content is a function of the seed). Samples wait in their bucket until the
bucket holds a full micro-batch; waiting samples carry over epochs and, at a stage switch, are
re-bucketed for the new stage. Nothing is dropped except clips shorter than every frame count
of the stage, and those are counted. The state is a few integers and the waiting samples, so a
resumed run sees exactly the samples it would have seen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from megatron_mfm.data.rng import keyed_generator
from megatron_mfm.data.shards.buckets import Bucket, assign_bucket, samples_per_micro_batch
from megatron_mfm.data.shards.catalog import SampleEntry
from megatron_mfm.data.shards.stages import StageSchedule


@dataclass
class PlannedMicroBatch:
    bucket: Bucket
    stage: int
    entries: list[int]
    """Catalog indices of its samples."""
    sample_ids: list[int]
    """Run-unique ids (seed the sample's task, noise and timestep)."""


class MicroBatchPlanner:
    def __init__(self, catalog: list[SampleEntry], schedule: StageSchedule, seed: int, fps: float,
                 shuffle_window: int, micro_batch_size: int):
        if not catalog:
            raise ValueError("the shard catalog is empty")
        self.catalog, self.schedule, self.seed, self.fps = catalog, schedule, seed, fps
        self.shuffle_window, self.micro_batch_size = max(1, shuffle_window), micro_batch_size
        self._shard_ranges = self._contiguous_shards()
        self._order: list[int] | None = None
        self.state = {
            "epoch": 0, "cursor": 0, "stage": 0, "next_sample_id": 0, "arrivals": 0,
            "waiting": {},  # bucket name -> [[catalog index, arrival number], ...]
            "too_short": 0, "steps": 0,
        }

    def _contiguous_shards(self) -> list[tuple[int, int]]:
        ranges, start = [], 0
        for i in range(1, len(self.catalog) + 1):
            if i == len(self.catalog) or self.catalog[i].shard != self.catalog[start].shard:
                ranges.append((start, i))
                start = i
        return ranges

    def epoch_order(self, epoch: int) -> list[int]:
        """Catalog indices of one epoch: shards permuted, then shuffled within windows."""
        if self._order is None or self._order_epoch != epoch:
            shard_order = torch.randperm(len(self._shard_ranges), generator=keyed_generator(self.seed, epoch))
            flat = [i for s in shard_order.tolist() for i in range(*self._shard_ranges[s])]
            order = []
            for w, start in enumerate(range(0, len(flat), self.shuffle_window)):
                window = flat[start:start + self.shuffle_window]
                perm = torch.randperm(len(window), generator=keyed_generator(self.seed, epoch, w + 1))
                order.extend(window[p] for p in perm.tolist())
            self._order, self._order_epoch = order, epoch
        return self._order

    def _bucket_of(self, index: int) -> Bucket | None:
        stage = self.schedule.stages[self.state["stage"]]
        return assign_bucket(self.catalog[index], stage.resolution_pairs, stage.frames, self.fps)

    def _size_of(self, bucket: Bucket) -> int:
        stage = self.schedule.stages[self.state["stage"]]
        return samples_per_micro_batch(bucket, stage.token_budget, self.micro_batch_size)

    def _enter_stage(self, stage: int) -> None:
        """Re-bucket the waiting samples for the new stage, oldest first."""
        waiting = sorted((a, i) for items in self.state["waiting"].values() for i, a in items)
        self.state["stage"], self.state["waiting"] = stage, {}
        for arrival, index in waiting:
            self._wait(index, arrival)

    def _wait(self, index: int, arrival: int) -> str | None:
        """Put a sample in its bucket's queue; the bucket name, or None for a too-short clip."""
        bucket = self._bucket_of(index)
        if bucket is None:
            self.state["too_short"] += 1
            return None
        self.state["waiting"].setdefault(bucket.name, []).append([index, arrival])
        return bucket.name

    def _pop_full(self, name: str) -> PlannedMicroBatch | None:
        """The oldest full micro-batch waiting in bucket ``name``, if there is one."""
        bucket, items = Bucket.parse(name), self.state["waiting"].get(name, [])
        size = self._size_of(bucket)
        if len(items) < size:
            return None
        taken, self.state["waiting"][name] = items[:size], items[size:]
        if not self.state["waiting"][name]:
            del self.state["waiting"][name]
        first = self.state["next_sample_id"]
        self.state["next_sample_id"] += size
        return PlannedMicroBatch(bucket, self.state["stage"], [i for i, _ in taken], list(range(first, first + size)))

    def plan_step(self, micro_batches: int) -> list[PlannedMicroBatch]:
        """The next step's ``micro_batches`` micro-batches (all data-parallel ranks)."""
        stage = self.schedule.index_at(self.state["steps"])
        if stage != self.state["stage"]:
            self._enter_stage(stage)
        planned: list[PlannedMicroBatch] = []
        for name in sorted(self.state["waiting"]):  # re-bucketed samples may fill micro-batches now
            while len(planned) < micro_batches and (batch := self._pop_full(name)):
                planned.append(batch)
        limit = len(self.catalog) * max(2, self._largest_micro_batch())
        scanned = 0
        while len(planned) < micro_batches:
            if scanned > limit:
                raise ValueError(
                    f"data.stages[{self.schedule.stages[stage].name}]: {scanned} samples fill no micro-batch "
                    f"(clips shorter than the stage's frames, or too few samples for its token budget)"
                )
            order = self.epoch_order(self.state["epoch"])
            index = order[self.state["cursor"]]
            self.state["cursor"] += 1
            if self.state["cursor"] == len(order):
                self.state["epoch"], self.state["cursor"] = self.state["epoch"] + 1, 0
            self.state["arrivals"] += 1
            scanned += 1
            name = self._wait(index, self.state["arrivals"])
            if name and (batch := self._pop_full(name)):
                planned.append(batch)
                scanned = 0
        self.state["steps"] += 1
        return planned

    def _largest_micro_batch(self) -> int:
        stage = self.schedule.stages[self.state["stage"]]
        smallest = min((Bucket(h, w, 1) for h, w in stage.resolution_pairs), key=lambda b: b.tokens)
        return samples_per_micro_batch(smallest, stage.token_budget, self.micro_batch_size)

    def state_dict(self) -> dict:
        return copy.deepcopy(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = copy.deepcopy(state)
