"""The training step's micro-batches, the next step's fetched while the device runs this one.

A step waits for the device once, at its skip decision (``loop.finite_and_stop``), which reads
the backward's gradient norm. When the next step's batch was fetched after that read, the device
idled through the fetch: a host-bound step (small clips under CUDA graphs, whose batch arrives
from worker processes) spent ~6-8 ms of each ~53 ms step there on an H200 (the logged data wait
of the convergence recipe; docs/PERFORMANCE.md, session 14). Fetched before the read, the fetch
overlaps the backward instead.

What a checkpoint stores and what the log reports stay those of the batches trained: each
fetched step keeps the loader's state and counters as they were right after its own fetch,
before the next step's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from megatron_mfm.data.batch import MicroBatch
from megatron_mfm.data.loader import SyntheticLoader
from megatron_mfm.data.packing import PackedMicroBatch, pack_micro_batches
from megatron_mfm.data.shards.streaming import ShardLoader
from megatron_mfm.training.observability import phase


@dataclass(frozen=True)
class StepBatch:
    """One step's micro-batches for this rank, and the loader as this step leaves it."""

    micro_batches: list[MicroBatch | PackedMicroBatch]
    fetch_seconds: float
    """Host time the fetch took (spent during the previous step when fetched ahead)."""
    loader_state: dict
    """The loader's state once this step's samples are consumed: what a checkpoint after it holds."""
    skipped_samples: int
    sidecar_misses: int


class StepBatches:
    """Hands out each step's batch; ``fetch_ahead`` gets the next one early."""

    def __init__(self, loader: SyntheticLoader | ShardLoader, token_budget: int):
        self.loader = loader
        self.token_budget = token_budget
        """``data.packing.token_budget``: this rank's samples regrouped by tokens (0: as rendered)."""
        self.current: StepBatch | None = None
        """The batch of the step running or last run; None before the first."""
        self._ahead: StepBatch | None = None

    def _fetch(self) -> StepBatch:
        start = time.perf_counter()
        with phase("data"):
            micro_batches = self.loader.next_global_batch()
            if self.token_budget:
                micro_batches = pack_micro_batches(micro_batches, self.token_budget)
        loader = self.loader
        return StepBatch(micro_batches, time.perf_counter() - start, loader.state_dict(), loader.skipped_samples,
                         sum(loader.sidecar_misses.values()))

    def next(self) -> StepBatch:
        """This step's batch: the one fetched ahead, else fetched now."""
        self.current, self._ahead = self._ahead or self._fetch(), None
        return self.current

    def fetch_ahead(self) -> None:
        """Fetch the next step's batch now (while the device still works on this step's)."""
        self._ahead = self._fetch()

    def loader_state(self) -> dict:
        """The loader's state after the batches trained (a batch fetched ahead not counted)."""
        return self.current.loader_state if self.current else self.loader.state_dict()

    @property
    def consumed_samples(self) -> int:
        return self.loader_state()["consumed_samples"]
