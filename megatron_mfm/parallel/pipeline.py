"""Pipeline-parallel stages run as one model for inference: sampling under PP.

``PipelinedModel(chunks)(latents, timestep, text, ...)`` runs one forward-only pass through
every pipeline stage with megatron's schedule (the activations travel between stages as in
training) and broadcasts the last stage's output to every stage, so each rank of a pipeline
holds what one process's model would return and every rank runs the same sampling loop.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mfm.model.dit import ModelChunks
from megatron_mfm.model.geometry import token_grid

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_DIMS = 6


def every_chunk(items: list, chunks: int) -> Iterator | list[Iterator]:
    """The data iterator megatron's schedule wants: one per model chunk when interleaved (every
    chunk reads each micro-batch: text, timestep and targets are needed on all stages)."""
    return [iter(items) for _ in range(chunks)] if chunks > 1 else iter(items)


def broadcast_from_last_stage(output: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The last pipeline stage's ``output`` on every stage of its pipeline (shape and dtype too)."""
    group = parallel_state.get_pipeline_model_parallel_group()
    source = parallel_state.get_pipeline_model_parallel_last_rank()
    header = torch.zeros(_MAX_DIMS + 2, dtype=torch.int64, device=device)
    if output is not None:
        header[0], header[1] = output.dim(), _DTYPES.index(output.dtype)
        header[2:2 + output.dim()] = torch.tensor(output.shape)
    dist.broadcast(header, src=source, group=group)
    if output is None:
        dims = int(header[0])
        output = torch.empty(header[2:2 + dims].tolist(), dtype=_DTYPES[int(header[1])], device=device)
    dist.broadcast(output.contiguous(), src=source, group=group)
    return output


class PipelinedModel:
    """This rank's model chunks called like one ``MfMDiT`` (forward only)."""

    def __init__(self, chunks: ModelChunks):
        self.chunks = chunks
        self.config = chunks.config

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.chunks.parameters()

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 text_mask: torch.Tensor | None = None, condition: torch.Tensor | None = None,
                 motion_score: torch.Tensor | None = None) -> torch.Tensor:
        inputs = (latents, timestep, text, text_mask, condition, motion_score)

        def forward_step(data_iterator: Iterator, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
            args = list(next(data_iterator))
            if not model.pre_process:  # only the first stage embeds the condition
                args[4] = None
            return model(*args), lambda output, non_loss_data=True: output

        # the interleaved schedule needs a multiple of the pipeline size: repeat the one input
        copies = parallel_state.get_pipeline_model_parallel_world_size() if len(self.chunks) > 1 else 1
        seq = self.chunks[0].pipeline_seq_length(token_grid(latents.shape[2:], self.config.patch_size))
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=every_chunk([inputs] * copies, len(self.chunks)),
            model=list(self.chunks),
            num_microbatches=copies, seq_length=seq, micro_batch_size=latents.shape[0],
            forward_only=True, collect_non_loss_data=True,
        )
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        return broadcast_from_last_stage(outputs[0] if last else None, latents.device)
