#!/usr/bin/env python3
"""What receiving the workers' micro-batches costs the training process.

Runs ``SyntheticLoader`` with ``--workers`` worker processes against a consumer that spends
``--step-ms`` a step, and reports per step the training process's own CPU time (all its threads,
not the workers') and the consumer's data wait (its time in ``next_global_batch``).
``--consumer sleep`` releases the GIL meanwhile, so the CPU time is the loader's receive cost;
``--consumer busy`` holds it in Python as a host-bound training step does (the convergence
recipe's), so the threads that receive the batches wait for the GIL, at most
``--switch-interval-ms`` each time (``sys.setswitchinterval``; Python's default 5). Prints JSON.

  python benchmarks/loader_receive.py --workers 2 --micro-batch-size 64 --steps 20
  python benchmarks/loader_receive.py --workers 2 --micro-batch-size 16 --step-ms 60 --consumer busy \
      --switch-interval-ms 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from megatron_mfm.data.loader import SyntheticLoader
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
from megatron_mfm.tasks.mixture import TaskMixture, TaskMixtureConfig


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def hold_the_gil(seconds: float) -> None:
    """Python bytecode for ``seconds``: the GIL stays with this thread but for forced switches."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=150.0)
    parser.add_argument("--consumer", choices=("sleep", "busy"), default="sleep")
    parser.add_argument("--switch-interval-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    spend = time.sleep if args.consumer == "sleep" else hold_the_gil
    config = SyntheticConfig(frames=args.frames, height=args.size, width=args.size, workers=args.workers)
    loader = SyntheticLoader(SyntheticVideoDataset(config), TaskMixture(TaskMixtureConfig()), args.micro_batch_size,
                             args.micro_batch_size, 0, 1, seed=0)
    default_interval = sys.getswitchinterval()
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    try:
        for _ in range(loader.ahead_steps + 3):  # worker start-up and the prefetch queue filled
            loader.next_global_batch()
        cpu, wall, waits = process_cpu_seconds(), time.perf_counter(), []
        for _ in range(args.steps):
            start = time.perf_counter()
            loader.next_global_batch()
            waits.append(time.perf_counter() - start)
            spend(args.step_ms / 1000)
        cpu, wall = process_cpu_seconds() - cpu, time.perf_counter() - wall
    finally:
        sys.setswitchinterval(default_interval)
        loader.close()
    result = {"workers": args.workers, "micro_batch_size": args.micro_batch_size, "consumer": args.consumer,
              "switch_interval_ms": args.switch_interval_ms, "step_ms": args.step_ms,
              "main_process_cpu_ms_per_step": round(cpu / args.steps * 1000, 1),
              "data_wait_ms_mean": round(statistics.mean(waits) * 1000, 2),
              "data_wait_ms_median": round(statistics.median(waits) * 1000, 2),
              "wall_ms_per_step": round(wall / args.steps * 1000, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
