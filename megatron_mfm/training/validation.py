"""Held-out validation loss: fixed samples, fixed noise and fixed sigmas, so the curve moves only
with the weights (the quality signal of diffusion pretraining; the training loss moves with
each step's random sigmas too).

The held-out set is cut into micro-batch slots like a training step (``SyntheticLoader`` /
``ShardLoader`` with the validation seed or shards, no guidance dropouts); each sample's noise
comes from its own generator, so every layout (TP/SP/PP/CP/DP) evaluates the same numbers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from megatron.core import parallel_state

from megatron_mfm.config import RunConfig
from megatron_mfm.data.batch import MicroBatch
from megatron_mfm.data.loader import SyntheticLoader
from megatron_mfm.data.shards.streaming import ShardLoader
from megatron_mfm.data.synthetic import SyntheticVideoDataset
from megatron_mfm.tasks.builders import TASKS
from megatron_mfm.tasks.mixture import TaskMixture
from megatron_mfm.training.schedule import reduce_task_losses, run_schedule
from megatron_mfm.training.step import make_forward_step

if TYPE_CHECKING:
    from megatron_mfm.training.loop import Trainer


def held_out_batches(config: RunConfig) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of the held-out set (the same at every call)."""
    validation, train = config.validation, config.train
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    tasks = replace(config.tasks, text_dropout=0.0, depth_dropout=0.0)
    if validation.shards_path:
        shards = replace(config.data.shards, path=validation.shards_path, precomputed="", workers=0)
        loader = ShardLoader(shards, [replace(config.data.stages[0], iterations=0)], tasks, train.micro_batch_size,
                             validation.num_samples, dp_rank, dp_size, validation.seed)
        try:
            return loader.next_global_batch()
        finally:
            loader.close()
    dataset = SyntheticVideoDataset(replace(config.data.synthetic, seed=validation.seed))
    loader = SyntheticLoader(dataset, TaskMixture(tasks), train.micro_batch_size, validation.num_samples, dp_rank,
                             dp_size, validation.seed)
    return loader.next_global_batch()


def sigma_key(sigma: float) -> str:
    return f"val/loss/sigma_{sigma:g}"


def loss_metrics(per_sigma: dict[float, torch.Tensor]) -> dict[str, float]:
    """``val/loss`` over everything, ``val/loss/<task>`` over the sigmas, ``val/loss/sigma_<s>``
    over the tasks, from each sigma's (2, tasks) loss sums and counts."""
    total = sum(per_sigma.values())
    sums, counts = total
    metrics = {"val/loss": (sums.sum() / counts.sum()).item()}
    metrics.update({f"val/loss/{task}": s / n for task, s, n in zip(TASKS, sums.tolist(), counts.tolist()) if n})
    metrics.update({sigma_key(sigma): (sums_s.sum() / counts_s.sum()).item()
                    for sigma, (sums_s, counts_s) in per_sigma.items()})
    return metrics


def validation_loss(trainer: Trainer) -> dict[str, float]:
    """Forward-only passes of the held-out set at each sigma; metrics known to every rank."""
    config = trainer.config
    batches = held_out_batches(config)
    per_sigma = {}
    for chunk in trainer.ddp:
        chunk.eval()
    try:
        with torch.no_grad():
            for sigma in config.validation.sigmas:
                forward_step = make_forward_step(trainer.encoders, config.flow_matching, config.validation.seed,
                                                 trainer.model_config.patch_size, trainer.dtype, trainer.device,
                                                 sigma=sigma)
                reports = run_schedule(config, trainer.ddp, batches, forward_step, forward_only=True)
                per_sigma[sigma] = reduce_task_losses(reports, trainer.device).cpu()
    finally:
        for chunk in trainer.ddp:
            chunk.train()
    return loss_metrics(per_sigma)
