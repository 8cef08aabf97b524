"""What a run reports beyond its loss: phase ranges for profilers, a profiling window, the
iteration line averaged over the logging interval, and the spread of step times over ranks
(stragglers). Step totals stay on the device and are read at logging intervals: every host read
of a device value waits for the GPU's queue, so the loop does them through ``to_host``."""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

from megatron_mfm.config import LoggingConfig
from megatron_mfm.tasks.builders import TASKS


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A named range of the step: in torch profiler traces, and an NVTX range for nsys on GPU."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if cuda:
            torch.cuda.nvtx.range_pop()


class HostReads:
    """How many times the training loop waited for the device (``to_host``, ``StepTimer``)."""

    count = 0


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU; on a GPU this waits until the queued work that makes it is done."""
    HostReads.count += 1
    return tensor.cpu()


class StepTimer:
    """Sums the time of the interval's steps without waiting for the GPU after each: on CUDA a
    pair of events per step, read once at the end of the interval; on the CPU the clock."""

    def __init__(self):
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.cpu_seconds = 0.0
        self._started: torch.cuda.Event | float = 0.0

    def start(self) -> None:
        self._started = _cuda_event() if torch.cuda.is_available() else time.perf_counter()

    def stop(self) -> None:
        if isinstance(self._started, float):
            self.cpu_seconds += time.perf_counter() - self._started
        else:
            self.events.append((self._started, _cuda_event()))

    def take_seconds(self) -> float:
        """The steps' seconds since the last call (one wait for the GPU when it timed any)."""
        seconds, self.cpu_seconds = self.cpu_seconds, 0.0
        if self.events:
            HostReads.count += 1
            self.events[-1][1].synchronize()
            seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000
            self.events = []
        return seconds


def _cuda_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class ProfileWindow:
    """Profiles iterations ``logging.profile_steps`` on ``logging.profile_ranks``: a torch
    profiler trace per rank (``<dir>/rank<N>.json``) and, on GPU, ``cudaProfilerStart/Stop`` so
    ``nsys profile --capture-range=cudaProfilerApi`` records exactly the window."""

    def __init__(self, config: LoggingConfig, rank: int, out_dir: Path):
        self.first, self.last = config.profile_steps or (0, -1)
        self.active = bool(config.profile_steps) and rank in config.profile_ranks
        self.trace = out_dir / f"rank{rank}.json"
        self.profiler: torch.profiler.profile | None = None

    def before_step(self, iteration: int) -> None:
        """Called before iteration ``iteration`` runs."""
        if self.active and iteration == self.first and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.profiler.start()
            # stacks name the code behind each gap in the device's timeline (benchmarks/trace_gaps.py)
            self.profiler = torch.profiler.profile(activities=activities, with_stack=True)
            self.profiler.start()

    def after_step(self, iteration: int) -> None:
        """Called after iteration ``iteration`` (its checkpoint included); the window's last one
        writes the trace."""
        if self.profiler is not None and iteration >= self.last:
            self.close()

    def close(self) -> None:
        if self.profiler is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        self.profiler.stop()
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.trace))
        self.profiler = None


class StepResult(NamedTuple):
    """What one optimizer step reports (summed over data-parallel ranks where it says so)."""

    task_losses: torch.Tensor
    """(2, tasks) loss sums and sample counts over all ranks, on the device."""
    grad_norm: float | None
    applied: bool
    """False when the step was skipped for non-finite loss or gradients."""
    flops: int
    """Model FLOPs of the step over all ranks."""
    tokens: int
    """Video tokens of the step over all ranks."""
    data_seconds: float
    """This rank's host time fetching the step's micro-batches (the loop fetches them during the
    step before, overlapping that step's device work: ``training/step_batches.py``)."""
    stop: bool = False
    """Some rank was asked to stop (SIGTERM) before this step's finite check."""


@dataclass
class IntervalMeter:
    """Sums of the steps since the last log line (``seconds`` set from a ``StepTimer`` before
    ``averages``); the losses summed on the device."""

    steps: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    flops: int = 0
    tokens: int = 0
    skipped: int = 0
    grad_norms: list[float] = field(default_factory=list)
    task_losses: torch.Tensor = field(default_factory=lambda: torch.zeros(2, len(TASKS)))

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.data_seconds += result.data_seconds
        self.flops += result.flops
        self.tokens += result.tokens
        self.skipped += not result.applied
        if result.grad_norm is not None:
            self.grad_norms.append(result.grad_norm)
        losses = result.task_losses  # a non-finite step's add nothing (decided on the device)
        self.task_losses = self.task_losses.to(losses.device) + losses.where(losses.isfinite().all(), 0.0)

    def averages(self, world_size: int, peak_tflops: float) -> dict:
        """The interval's per-iteration means (loss: over its samples; grad norm: over its
        applied steps)."""
        sums, counts = to_host(self.task_losses)
        samples = counts.sum().item()
        tflops_per_gpu = self.flops / self.seconds / world_size / 1e12
        metrics = {
            "global batch size": int(samples) // self.steps,
            "elapsed time per iteration (ms)": self.seconds / self.steps * 1000,
            "throughput per GPU (TFLOP/s/GPU)": tflops_per_gpu,
            "MFU": tflops_per_gpu / peak_tflops if peak_tflops else None,
            "loss": (sums.sum() / counts.sum()).item() if samples else float("nan"),
            "grad norm": statistics.fmean(self.grad_norms) if self.grad_norms else None,
            "number of skipped iterations": self.skipped,
            "samples/s": samples / self.seconds,
            "tokens/s": self.tokens / self.seconds,
            "flops per step": self.flops // self.steps,
            "data wait per iteration (ms)": self.data_seconds / self.steps * 1000,
        }
        metrics.update({f"loss/{task}": s / n for task, s, n in zip(TASKS, sums.tolist(), counts.tolist()) if n})
        return metrics


def rank_spread(step_seconds: float, data_seconds: float, device: torch.device) -> dict:
    """``spread`` of every rank's mean step time and data wait (collective: every rank calls it
    at the same iteration)."""
    mine = torch.tensor([[step_seconds, data_seconds]], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return spread(torch.cat(gathered).cpu())


def spread(times: torch.Tensor) -> dict:
    """Min/median/max over ranks of the step time, the slowest rank, and the longest data wait,
    from (ranks, [step seconds, data seconds])."""
    steps = times[:, 0]
    return {
        "step time min (ms)": steps.min().item() * 1000,
        "step time median (ms)": steps.median().item() * 1000,
        "step time max (ms)": steps.max().item() * 1000,
        "slowest rank": int(steps.argmax()),
        "data wait max (ms)": times[:, 1].max().item() * 1000,
    }


def memory_gb() -> dict:
    """Peak memory since the last call: GPU allocated/reserved, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        metrics = {"mem max allocated (GB)": torch.cuda.max_memory_allocated() / 2**30,
                   "mem max reserved (GB)": torch.cuda.max_memory_reserved() / 2**30}
        torch.cuda.reset_peak_memory_stats()
        return metrics
    return {"mem max RSS (GB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
