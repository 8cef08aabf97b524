#!/usr/bin/env python3
"""CPU the training process spends receiving and joining the workers' micro-batches.

Runs ``SyntheticLoader`` with ``--workers`` worker processes against a consumer that only sleeps
``--step-ms`` a step, and reports the training process's own CPU time (all its threads, not the
workers') per step: with a sleeping consumer that is the loader's receive-and-join cost, which on a
real run competes with the step for the GIL. Prints JSON.

  python benchmarks/loader_receive.py --workers 2 --micro-batch-size 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from megatron_mfm.data.loader import SyntheticLoader
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
from megatron_mfm.tasks.mixture import TaskMixture, TaskMixtureConfig


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=150.0)
    args = parser.parse_args(argv)
    config = SyntheticConfig(frames=args.frames, height=args.size, width=args.size, workers=args.workers)
    loader = SyntheticLoader(SyntheticVideoDataset(config), TaskMixture(TaskMixtureConfig()), args.micro_batch_size,
                             args.micro_batch_size, 0, 1, seed=0)
    try:
        for _ in range(3):  # worker start-up and the prefetch queue
            loader.next_global_batch()
        cpu, wall = process_cpu_seconds(), time.perf_counter()
        for _ in range(args.steps):
            loader.next_global_batch()
            time.sleep(args.step_ms / 1000)
        cpu, wall = process_cpu_seconds() - cpu, time.perf_counter() - wall
    finally:
        loader.close()
    result = {"workers": args.workers, "micro_batch_size": args.micro_batch_size,
              "main_process_cpu_ms_per_step": round(cpu / args.steps * 1000, 1),
              "wall_ms_per_step": round(wall / args.steps * 1000, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
