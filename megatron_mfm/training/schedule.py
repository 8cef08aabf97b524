"""Running micro-batches through megatron's schedule, and reducing what they report: shared by
training steps and held-out validation."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mfm.config import RunConfig
from megatron_mfm.data.batch import MicroBatch
from megatron_mfm.data.packing import PackedMicroBatch, parts_of, sample_tokens
from megatron_mfm.model.dit import MfMDiT
from megatron_mfm.model.geometry import latent_shape, token_grid
from megatron_mfm.parallel.pipeline import every_chunk
from megatron_mfm.tasks.builders import TASKS


def batch_tokens(batch: MicroBatch | PackedMicroBatch) -> int:
    """Video tokens of the micro-batch (all its samples)."""
    return sum(sample_tokens(part) * len(part.prompts) for part in parts_of(batch))


def pipeline_seq_length(model: MfMDiT, batch: MicroBatch | PackedMicroBatch) -> int:
    """megatron's ``seq_length`` of a micro-batch (``MfMDiT.pipeline_seq_length``)."""
    if isinstance(batch, PackedMicroBatch):
        shapes = [(len(part.prompts), *latent_shape(*part.pixels.shape[2:])) for part in batch.parts]
        return model.pipeline_seq_length(model.packed_sequence(shapes))
    return model.pipeline_seq_length(token_grid(latent_shape(*batch.pixels.shape[2:])[1:]))


def run_schedule(config: RunConfig, ddp: list[DistributedDataParallel],
                 micro_batches: list[MicroBatch] | list[PackedMicroBatch],
                 forward_step: Callable, forward_only: bool) -> list[dict]:
    """Forward (and backward unless ``forward_only``) of ``micro_batches`` through every model
    chunk; the loss reports of the last pipeline stage."""
    first_chunk = ddp[0].module  # with variable_seq_lengths the shapes travel with the tensors anyway
    seq = max(pipeline_seq_length(first_chunk, mb) for mb in micro_batches)
    packed = isinstance(micro_batches[0], PackedMicroBatch)  # one sequence of batch 1
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=every_chunk(micro_batches, len(ddp)), model=ddp,
        num_microbatches=len(micro_batches), seq_length=seq,
        micro_batch_size=1 if packed else config.train.micro_batch_size,
        forward_only=forward_only,
    )


def reduce_task_losses(reports: list[dict], device: torch.device) -> torch.Tensor:
    """(2, tasks) loss sums and counts over micro-batches and data-parallel ranks, known to every
    pipeline stage (only the last one computes losses; CP and TP ranks hold the same copy). On
    ``device``: reading it waits for the GPU."""
    total = torch.zeros(2, len(TASKS), device=device)
    for report in reports:
        total += report["task_loss"].float()
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total
