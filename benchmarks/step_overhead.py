#!/usr/bin/env python3
"""Host-side cost of one training step, part by part, on the real code paths (CPU-runnable).

Builds the trainer of ``--config`` (default: the convergence recipe, batch 64 of 9x64x64 clips)
with the tiny preset and no data workers, so the model's own math is small and what is left is
the per-sample work around it: collating a micro-batch, the text and video encoders, the
condition, each sample's noise and timestep, the loss and its per-task report, the step's
totals and syncs, the EMA update and the logging line. Each figure is the median of
``--repeats`` timed calls in milliseconds per micro-batch; ``train_step`` is a whole optimizer
step (rendering the clips included: in a real run worker processes do that off the step).

``--count-ops``: the step's would-be kernel launches by phase (``benchmarks/op_counts.py``);
``--kernels``: the GPU kernel time of one more step and its top kernels
(``benchmarks/kernel_profile.kernel_breakdown``), to read against ``train_step``: a step much
longer than its kernels is host-bound, one as long is GPU-bound.

  python benchmarks/step_overhead.py --output runs/step_overhead.json
  python benchmarks/step_overhead.py --count-ops --repeats 1 model.num_layers=8 train.precision=bf16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.kernel_profile import kernel_breakdown
from benchmarks.op_counts import step_kernel_counts
from megatron_mfm.config import load_config
from megatron_mfm.data.batch import collate
from megatron_mfm.data.rng import Stream, sample_generator
from megatron_mfm.diffusion.flow_matching import add_noise
from megatron_mfm.model.geometry import token_grid
from megatron_mfm.training import loop
from megatron_mfm.training.observability import IntervalMeter
from megatron_mfm.training.schedule import reduce_task_losses
from megatron_mfm.training.step import _condition, _latents, _loss, _text, noise_and_sigma
from megatron_mfm.training.step_batches import StepBatch
from megatron_mfm.utils.atomic import atomic_write_text

DEFAULT_OVERRIDES = ("model.preset=tiny", "model.backend=local", "model.cuda_graphs=false", "train.precision=fp32",
                     "data.synthetic.workers=0", "logging.interval=1000000")


def median_ms(work: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``work()`` in ms over ``repeats`` calls, after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def measure(trainer: loop.Trainer, repeats: int) -> dict[str, float]:
    """ms per micro-batch of each host-side part of a step (see the module docstring)."""
    config, device, encoders = trainer.config, trainer.device, trainer.encoders
    renderer = trainer.loader.micro_batch
    mbs, seed = renderer.micro_batch_size, config.train.seed
    ids = list(range(mbs))
    samples = [renderer.mixture.sample(renderer.dataset.clip(i, False), sample_generator(seed, i, Stream.TASK))
               for i in ids]
    batch = collate(samples, ids)
    pixels = batch.pixels.to(device)
    latents = _latents(encoders, batch, pixels, seed, device)
    tokens = math.prod(token_grid(latents.shape[2:], trainer.model_config.patch_size))
    noise, sigmas = noise_and_sigma(latents, batch.sample_ids, seed, config.flow_matching, tokens)
    _, target = add_noise(latents, noise, sigmas)
    output = torch.randn_like(target)
    reports = [_loss(target, batch.tasks, 1.0, output)[1]]
    step_batch = StepBatch([batch], fetch_seconds=0.0, loader_state={}, skipped_samples=0, sidecar_misses=0)
    meter = IntervalMeter(seconds=1.0)
    meter.add(loop.train_step(trainer))
    parts = {
        "collate": lambda: collate(samples, ids),
        "text_encode": lambda: _text(encoders, batch, device),
        "codec_encode": lambda: _latents(encoders, batch, batch.pixels.to(device), seed, device),
        "condition": lambda: _condition(encoders, batch, None, device),
        "noise_and_sigma": lambda: noise_and_sigma(latents, batch.sample_ids, seed, config.flow_matching,
                                                   tokens),
        "add_noise": lambda: add_noise(latents, noise, sigmas),
        "loss_and_report": lambda: _loss(target, batch.tasks, 1.0, output)[1]["task_loss"],
        "reduce_task_losses": lambda: reduce_task_losses(reports, device),
        "step_totals": lambda: loop._step_totals(trainer, step_batch),
        "finite_and_stop": lambda: loop.finite_and_stop(reduce_task_losses(reports, device),
                                                         torch.ones((), device=device), False),
        "ema_update": lambda: trainer.ema.update(trainer.state.iteration),
        "metrics_line": lambda: loop._metrics(trainer, meter),
    }
    figures = {name: median_ms(work, repeats) for name, work in parts.items()}
    figures["sum_of_parts"] = round(sum(figures.values()), 2)
    figures["train_step"] = median_ms(lambda: loop.train_step(trainer), max(1, repeats // 4))
    figures["render_micro_batch"] = median_ms(lambda: renderer(0), max(1, repeats // 4))
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/convergence.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides after the defaults "
                        f"({' '.join(DEFAULT_OVERRIDES)})")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per part; the median counts")
    parser.add_argument("--output", type=Path, help="JSON file for the figures")
    parser.add_argument("--count-ops", action="store_true", help="also count a step's kernel launches by phase")
    parser.add_argument("--kernels", action="store_true", help="also profile a step's GPU kernels")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = load_config(args.config, [*DEFAULT_OVERRIDES, *args.overrides])
    trainer = loop.setup(config)
    try:
        figures = measure(trainer, args.repeats)
        extra = {"kernel_launches_per_step": step_kernel_counts(trainer)} if args.count_ops else {}
        if args.kernels:
            extra["kernels_of_a_step"] = kernel_breakdown(lambda: loop.train_step(trainer))
    finally:
        trainer.loader.close()
    result = {"config": args.config, "overrides": [*DEFAULT_OVERRIDES, *args.overrides],
              "micro_batch_size": config.train.micro_batch_size, "threads": torch.get_num_threads(),
              "ms_per_micro_batch": figures, **extra}
    text = json.dumps(result, indent=1)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
