#!/usr/bin/env python3
"""Single-core throughput of the built-in synthetic data: how many workers a training run needs.

Times, on one thread, the three stages a ``data.synthetic.workers`` process runs per sample:
rendering a clip (``SyntheticVideoDataset.clip``), building its task sample (masks, degradations,
the 5-channel condition: ``TaskMixture.sample``), and the whole micro-batch (``SlotRenderer``,
which also collates). Each figure is the best of ``--repeats`` timed passes (a shared machine's
noise only ever slows a pass down). Divide a step's samples/s by the last figure for the workers.

  python benchmarks/synthetic_data.py --frames 9 --height 64 --width 64 --output runs/synthetic_data.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from megatron_mfm.data.loader import SlotRenderer
from megatron_mfm.data.rng import Stream, sample_generator
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
from megatron_mfm.tasks.mixture import TaskMixture, TaskMixtureConfig
from megatron_mfm.utils.atomic import atomic_write_text


def best_rate(work: Callable[[int], None], count: int, repeats: int) -> float:
    """Items per second of ``work(i)`` over ``count`` items, the best of ``repeats`` passes."""
    work(0)  # warm-up: first-call allocations and imports
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(count):
            work(index)
        best = min(best, time.perf_counter() - start)
    return count / best


def measure(args: argparse.Namespace) -> dict:
    config = SyntheticConfig(frames=args.frames, height=args.height, width=args.width, max_objects=args.max_objects)
    dataset, mixture = SyntheticVideoDataset(config), TaskMixture(TaskMixtureConfig())
    videos = [dataset.clip(i, is_image=False) for i in range(args.samples)]
    images = [dataset.clip(i, is_image=True) for i in range(args.samples)]
    task = lambda clips: lambda i: mixture.sample(clips[i], sample_generator(0, i, Stream.TASK))  # noqa: E731
    slots = SlotRenderer(dataset, mixture, args.micro_batch_size, seed=0)
    batches = max(1, args.samples // args.micro_batch_size)
    rates = {
        "video_clips_per_s": best_rate(lambda i: dataset.clip(i, is_image=False), args.samples, args.repeats),
        "image_clips_per_s": best_rate(lambda i: dataset.clip(i, is_image=True), args.samples, args.repeats),
        "video_task_samples_per_s": best_rate(task(videos), args.samples, args.repeats),
        "image_task_samples_per_s": best_rate(task(images), args.samples, args.repeats),
        "micro_batch_samples_per_s": best_rate(slots, batches, args.repeats) * args.micro_batch_size,
    }
    return {key: round(value, 1) for key, value in rates.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=9, help="frames of a video clip (4k+1)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--max-objects", type=int, default=3, help="shapes per scene: 1 to this many")
    parser.add_argument("--samples", type=int, default=64, help="samples timed per pass")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best counts")
    parser.add_argument("--output", type=Path, help="JSON file for the figures")
    args = parser.parse_args(argv)
    if min(args.samples, args.micro_batch_size, args.repeats) < 1:
        parser.error("--samples, --micro-batch-size and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # a worker process's setting (data/loader.py)
    try:
        rates = measure(args)
    except ValueError as error:  # the synthetic config's own checks name the bad size
        raise SystemExit(f"synthetic_data.py: {error}") from None
    record = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rates": rates}
    print(json.dumps(rates, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
