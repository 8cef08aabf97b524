"""How a run's components are built, before the loop: machine checks, the layer spec, the
model chunks (with their seeded initial weights), megatron DDP, the optimizer and its LR
schedule, the data loader. ``training/loop.setup`` puts them together."""

from __future__ import annotations

import os

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.spec_utils import ModuleSpec
from torch.utils._triton import has_triton

from megatron_mfm.config import ConfigError, RunConfig
from megatron_mfm.data.batch import MicroBatch
from megatron_mfm.data.loader import SyntheticLoader
from megatron_mfm.data.shards.streaming import ShardLoader
from megatron_mfm.data.synthetic import SyntheticVideoDataset
from megatron_mfm.model.attention_backends import AttentionBackendUnavailable, resolve_attention_backend
from megatron_mfm.model.config import MfMConfig
from megatron_mfm.model.dit import ModelChunks, build_model_chunks
from megatron_mfm.model.specs import default_layer_spec, transformer_engine_available, uses_transformer_engine
from megatron_mfm.parallel.initialize import initialize_parallel
from megatron_mfm.tasks.mixture import TaskMixture
from megatron_mfm.training.precision_aware import check_fused_adam, load_remainders_as_int16, precision_aware_options


def layer_spec_for(config: RunConfig) -> ModuleSpec:
    """The layer spec of ``model.backend`` with the core attention of ``model.attention_backend``
    (auto resolved for this machine and precision; under ``model.cuda_graphs`` to SDPA)."""
    te = uses_transformer_engine(config.model.backend)
    requested = config.model.attention_backend
    if config.model.cuda_graphs and requested == "auto":
        # graphs pay for small clips, whose attention costs little; SDPA without cuDNN's fused
        # attention is the one that trains under capture (RunConfig, docs/PERFORMANCE.md session 13)
        requested = "sdpa"
    try:
        attention = resolve_attention_backend(requested, config.train.precision != "fp32", te)
    except AttentionBackendUnavailable as error:
        raise ConfigError(f"model.attention_backend={config.model.attention_backend}: {error}") from None
    return default_layer_spec(config.model.backend, attention)


def build_loader(config: RunConfig, dtype: torch.dtype = torch.float32) -> SyntheticLoader | ShardLoader:
    """This data-parallel rank's loader (ranks of one TP/CP/PP group get the same one); ``dtype``:
    the training step's compute dtype, the one synthetic conditions are rendered in."""
    train, seed = config.train, config.train.seed
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    if config.data.source == "shards":
        return ShardLoader(config.data.shards, config.data.stages, config.tasks, train.micro_batch_size,
                           train.global_batch_size, dp_rank, dp_size, seed)
    return SyntheticLoader(SyntheticVideoDataset(config.data.synthetic), TaskMixture(config.tasks),
                           train.micro_batch_size, train.global_batch_size, dp_rank, dp_size, seed,
                           pin=MicroBatch.pinned if torch.cuda.is_available() else None, condition_dtype=dtype)


def check_machine(config: RunConfig) -> None:
    """Checks that need the disk, the world size or this machine, before any process group."""
    config.check_files()
    config.check_world(int(os.environ.get("WORLD_SIZE", "1")))
    if config.train.precision == "fp8" and not transformer_engine_available():
        raise ConfigError("train.precision=fp8 needs Transformer Engine on a GPU: pip install 'megatron_mfm[gpu]' "
                          "on a GPU machine, or train.precision=bf16")
    if config.model.compile_glue and torch.cuda.is_available() and not has_triton():
        raise ConfigError("model.compile_glue=true needs triton for torch.compile on the GPU (pip install triton, "
                          "the version your torch names), or model.compile_glue=false")
    ring = config.parallel.context_parallel > 1 and config.parallel.context_parallel_comm == "p2p"
    if config.data.packing.token_budget and ring and torch.cuda.is_available():
        raise ConfigError("data.packing.token_budget with parallel.context_parallel_comm=p2p: the ring over a packed "
                          "sequence has masked block kernels only on the CPU; use context_parallel_comm=a2a on a GPU")
    if config.model.cuda_graphs and not torch.cuda.is_available():
        raise ConfigError("model.cuda_graphs=true captures CUDA graphs: it needs a GPU (set it false on the CPU)")
    if config.model.recompute == "auto" and not torch.cuda.is_available():
        raise ConfigError("model.recompute=auto measures GPU memory: it needs a GPU (use true or false on the CPU)")
    check_fused_adam(config.optimizer)


def wrap_ddp(config: RunConfig, model_config: MfMConfig, model: ModelChunks) -> list[DistributedDataParallel]:
    """One megatron DDP per model chunk, with the gradient reduction overlapped with backward
    when ``parallel.overlap_grad_reduce``; its buffers hold ``optimizer.grad_dtype`` gradients."""
    overlap = config.parallel.overlap_grad_reduce
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.optimizer.grad_dtype == "fp32",
        use_distributed_optimizer=config.parallel.distributed_optimizer, overlap_grad_reduce=overlap,
    )
    # DDP makes each weight's gradient accumulator, which keeps the stream current then: a CUDA
    # graph's backward cannot make the legacy default stream wait on its capture (an H200 run
    # failed so, session 12), so with graphs they are made on a stream of their own
    side = torch.cuda.Stream() if model_config.cuda_graphs and torch.cuda.is_available() else None
    with torch.cuda.stream(side):  # None: the current stream
        # only the first chunk's gradients are bucketed for overlap (megatron's rule)
        ddp = [DistributedDataParallel(model_config, ddp_config, chunk, disable_bucketing=i > 0)
               for i, chunk in enumerate(model)]
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)  # the zeroed gradient buffers
    model_config.finalize_model_grads_func = finalize_model_grads
    if overlap:  # the schedule holds the reduction back until the last micro-batch's backward
        no_sync, start = [c.no_sync for c in ddp], [c.start_grad_sync for c in ddp]
        model_config.no_sync_func = no_sync[0] if len(ddp) == 1 else no_sync
        model_config.grad_sync_func = start[0] if len(ddp) == 1 else start
    return ddp


def build_optimizer(config: RunConfig, model_config: MfMConfig,
                    ddp: list[DistributedDataParallel]) -> tuple[object, OptimizerParamScheduler]:
    """Megatron's Adam (distributed or not) and its LR schedule, stepped in samples."""
    opt = config.optimizer
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.beta1, adam_beta2=opt.beta2, adam_eps=opt.eps, clip_grad=opt.clip_grad,
            bf16=model_config.bf16, params_dtype=model_config.params_dtype,
            use_distributed_optimizer=config.parallel.distributed_optimizer, **precision_aware_options(opt),
        ),
        ddp,
    )
    load_remainders_as_int16(optimizer)
    gbs, iterations = config.train.global_batch_size, config.train.iterations
    warmup = opt.warmup_iterations * gbs
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(iterations * gbs, warmup + 1), lr_decay_style=opt.decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=iterations * gbs, wd_incr_style="constant",
    )
    return optimizer, scheduler


def build_model(config: RunConfig) -> tuple[MfMConfig, ModelChunks]:
    """Validate, create process groups and build this rank's model chunks on its device, with
    the initial weights every layout shares (seeded by ``train.seed``)."""
    check_machine(config)
    layer_spec = layer_spec_for(config)
    model_config = config.to_model_config()
    initialize_parallel(tensor_parallel_size=config.parallel.tensor_parallel,
                        pipeline_parallel_size=config.parallel.pipeline_parallel,
                        context_parallel_size=config.parallel.context_parallel, seed=config.train.seed,
                        virtual_pipeline_size=model_config.virtual_pipeline_model_parallel_size)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return model_config, build_model_chunks(model_config, layer_spec).to(device)
