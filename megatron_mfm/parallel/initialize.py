"""Process groups and seeds for one run: torch.distributed + megatron parallel_state."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_mfm.parallel import cpu_compat


def initialize_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    virtual_pipeline_size: int | None = None,
    timeout_minutes: int = 30,
) -> None:
    """Initialise torch.distributed (from torchrun's env, or as a single process) and megatron's
    model-parallel groups, then seed every RNG megatron tracks.

    On a machine without CUDA the CPU compatibility layer is applied first and gloo is used.
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.apply()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # A single process outside torchrun needs no TCP rendezvous (and no free port).
        store = dist.HashStore() if world_size == 1 and "MASTER_PORT" not in os.environ else None
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            rank=rank,
            world_size=world_size,
            store=store,
            timeout=timedelta(minutes=timeout_minutes),
        )
    world_size = dist.get_world_size()
    model_parallel = tensor_parallel_size * pipeline_parallel_size * context_parallel_size
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = "
            f"{tensor_parallel_size}*{pipeline_parallel_size}*{context_parallel_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
            context_parallel_size=context_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_size,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
