"""Timing helpers shared by the benchmarks: device synchronisation, freeing memory between
models, and the median time of a step after warm-up."""

from __future__ import annotations

import gc
import statistics
import time

import torch

TEXT_TOKENS = 77
"""Text tokens of every benchmark sample (the official pipeline's T5 length)."""


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    """Free what the last model left (DDP hooks make reference cycles) before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
