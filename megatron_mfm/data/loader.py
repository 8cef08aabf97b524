"""Micro-batches for one optimizer step, a pure function of (seed, consumed samples, DP rank).

Sample ``i`` of the run always gets the same clip, task, noise and timestep, whatever the
parallel layout: a global batch is cut into micro-batch slots, slot ``s`` holding samples
``s*mbs .. s*mbs+mbs-1``; DP rank ``r`` takes slots ``base + m*dp + r``. The only state is the
number of consumed samples, saved in checkpoints, so a resumed run sees exactly the samples it
would have seen. With ``data.synthetic.workers`` the micro-batches of the next steps are
rendered ahead by worker processes (the same function of the slot, so the same data), each
micro-batch whole by one worker, with enough steps in flight to keep every worker busy. Whole
micro-batches arrive as one shared-memory tensor each: the training process receives them
without joining parts (a ``torch.cat`` of a step's 75 MB cost it ~45 ms of CPU a step). With
``pin``, threads of the training process copy each arrived micro-batch into page-locked
memory (``MicroBatch.pinned``) while the model trains, so the step's host-to-device copies
do not hold it.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Callable

import torch

from megatron_mfm.data.batch import MicroBatch, collate
from megatron_mfm.data.rng import Stream, sample_generator
from megatron_mfm.data.synthetic import SyntheticVideoDataset
from megatron_mfm.tasks.mixture import TaskMixture
from megatron_mfm.utils.preemption import children_shielded

PIN_THREADS = 4
"""Micro-batches pinned at once. One thread did not keep up on an H200 at batch 256 (session 9:
the step waited ~40 ms for data at 256 clips and ~85 ms at 512, in proportion to the bytes, with
12 or 24 workers alike); the copies release the GIL, so threads share the work."""


@dataclass
class SlotRenderer:
    """Micro-batch slot -> MicroBatch (all images or all videos); picklable for worker processes.
    ``condition_dtype``: the training step casts the condition to its compute dtype before the
    model sees it, so rendering it in that dtype changes no bit and halves the largest tensor
    the workers hand over in a bf16 run (5 channels at full resolution: 189 MB of fp32 a step
    of 256 9x64x64 clips)."""

    dataset: SyntheticVideoDataset
    mixture: TaskMixture
    micro_batch_size: int
    seed: int
    condition_dtype: torch.dtype = torch.float32

    def __call__(self, slot: int) -> MicroBatch:
        kind = sample_generator(self.seed, slot, Stream.MICRO_BATCH_KIND)
        is_image = torch.rand(1, generator=kind).item() < self.dataset.config.image_fraction
        first = slot * self.micro_batch_size
        ids = list(range(first, first + self.micro_batch_size))
        samples = []
        for sample_id in ids:
            clip = self.dataset.clip(sample_id, is_image)
            samples.append(self.mixture.sample(clip, sample_generator(self.seed, sample_id, Stream.TASK)))
        batch = collate(samples, ids)
        return replace(batch, condition=batch.condition.to(self.condition_dtype))


class SyntheticLoader:
    """This DP rank's micro-batches of each global batch, from the synthetic dataset."""

    skipped_samples = 0  # rendered samples never fail
    sidecar_misses: Mapping[str, int] = MappingProxyType({})  # and have no sidecars

    def __init__(self, dataset: SyntheticVideoDataset, mixture: TaskMixture, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 pin: Callable[[MicroBatch], MicroBatch] | None = None,
                 condition_dtype: torch.dtype = torch.float32):
        """``pin``: applied to each micro-batch rendered ahead, on ``PIN_THREADS`` threads of its
        own (``MicroBatch.pinned`` on a GPU; ignored without ``workers``). ``condition_dtype``: the
        training step's compute dtype (``SlotRenderer``)."""
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch size must be a multiple of micro batch size x DP size")
        self.micro_batch = SlotRenderer(dataset, mixture, micro_batch_size, seed, condition_dtype)
        self.mbs, self.gbs = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = 0
        workers, prefetch = dataset.config.workers, dataset.config.prefetch_steps
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=torch.set_num_threads, initargs=(1,))
                      if workers else None)
        self._pin = pin
        self._pinner = ThreadPoolExecutor(PIN_THREADS, thread_name_prefix="pin") if pin and workers else None
        # steps being rendered, from consumed_samples on: each its micro-batches' (render, ready)
        # futures (ready: the pinned copy, or the render itself)
        self._queue: deque[list[tuple[Future, Future]]] = deque()
        # at least one micro-batch a worker in flight
        self.ahead_steps = max(prefetch, -(-workers // self.num_microbatches) - 1) if workers else 0

    @property
    def num_microbatches(self) -> int:
        return self.gbs // (self.mbs * self.dp_size)

    def _slots(self, step_ahead: int) -> list[int]:
        base = (self.consumed_samples + step_ahead * self.gbs) // self.mbs
        return [base + m * self.dp_size + self.dp_rank for m in range(self.num_microbatches)]

    def next_global_batch(self) -> list[MicroBatch]:
        """This rank's micro-batches for the next step; advances the consumed-sample count."""
        if self._pool is None:
            batches = [self.micro_batch(slot) for slot in self._slots(0)]
        else:
            with children_shielded():  # a submit may start a worker
                while len(self._queue) <= self.ahead_steps:
                    self._queue.append([self._submit(slot) for slot in self._slots(len(self._queue))])
            batches = [ready.result() for _, ready in self._queue.popleft()]
        self.consumed_samples += self.gbs
        return batches

    def _submit(self, slot: int) -> tuple[Future, Future]:
        render = self._pool.submit(self.micro_batch, slot)
        return render, (self._pinner.submit(lambda: self._pin(render.result())) if self._pinner else render)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        for step in self._queue:
            for futures in step:
                for future in futures:
                    future.cancel()
        self._queue.clear()
        self.consumed_samples = int(state["consumed_samples"])

    def close(self) -> None:
        if self._pinner is not None:
            self._pinner.shutdown(cancel_futures=True)
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
