"""One row of ``benchmarks/profile_throughput.py``: our real training step (megatron schedule, DDP,
optimizer) on random on-device inputs, timed and measured; and what the plain and official
baselines of the row take from it (our initial weights, the inputs, the target)."""

from __future__ import annotations

import contextlib

import megatron.core
import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from benchmarks.kernel_profile import kernel_breakdown, kernel_roofline_seconds
from benchmarks.plain_baseline import PlainCase, initial_weights
from benchmarks.profile_sweep import Layout, data_parallel_size, recomputes_whole_blocks, row_config, world_size
from benchmarks.timing import TEXT_TOKENS, timed
from megatron_mfm.config import RunConfig
from megatron_mfm.diffusion.flow_matching import per_sample_mse
from megatron_mfm.model.config import MfMConfig
from megatron_mfm.model.geometry import clip_tokens, latent_shape, token_grid
from megatron_mfm.model.recompute_budget import after_optimizer_step
from megatron_mfm.training.flops import gpu_peak_tflops, training_flops
from megatron_mfm.training.loop import Trainer, finite_and_stop, setup
from megatron_mfm.training.optimizer_step import apply_update, prepare_update


def random_batch(config: MfMConfig, frames: int, height: int, width: int, batch: int, device: torch.device,
                 dtype: torch.dtype, seed: int) -> tuple[dict, torch.Tensor]:
    """Model inputs and a velocity target, drawn from ``seed`` alone (not from whatever the
    model's construction left in the global generator)."""
    generator = torch.Generator(device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    _, t, h, w = latent_shape(frames, height, width)
    inputs = dict(
        latents=normal(batch, config.in_channels, t, h, w),
        timestep=torch.rand(batch, generator=generator, device=device) * 1000,
        text=normal(batch, TEXT_TOKENS, config.text_hidden_size),
        text_mask=torch.ones(batch, TEXT_TOKENS, device=device),
        condition=normal(batch, config.condition_channels, frames, height, width),
        motion_score=torch.full((batch,), 5.0, device=device),
    )
    return inputs, normal(batch, config.out_channels, t, h, w)


def velocity_loss(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Flow-matching MSE against ``target``, as in training; the dict carries the value to the
    row's losses (a copy: megatron scales the loss by the CP size in place)."""
    loss = per_sample_mse(output, target).mean()
    return loss, {"loss": loss.detach().clone()}


def launch_losses(losses: list[torch.Tensor], copies: int) -> list[float]:
    """Each step's loss averaged over data-parallel ranks. Ranks of the last pipeline stage hold
    a value (each TP and CP rank a copy), the others zero: so the world's sum over tp * cp * dp."""
    total = torch.stack(losses).float()
    dist.all_reduce(total)
    return (total / copies).tolist()


def full_iteration_graph(forward_backward, seed: int):
    """megatron's full-iteration CUDA graph around ``forward_backward``: eager on the first call,
    captured on the second, replayed after. Its graphs and input buffers live on the class; they
    are cleared so that each row captures its own. The capture registers every CUDA RNG state
    with the graph, which takes graph-safe generators: megatron's tracker keeps tensors unless
    seeded with ``use_cudagraphable_rng`` (an H200 row failed on it, session 10)."""
    from megatron.core import tensor_parallel
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper, StaticBufferLoader

    tensor_parallel.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=True, force_reset_rng=True)
    FullCudaGraphWrapper.curr_iteration = {"training": 0, "validation": 0}
    FullCudaGraphWrapper.cuda_graph = {"training": None, "validation": None}
    StaticBufferLoader.static_buffers = {"training": [], "validation": []}
    return FullCudaGraphWrapper(forward_backward, cuda_graph_warmup_steps=1)


def core_attention_name(model: torch.nn.Module) -> str | None:
    """The class behind the first block's self-attention (what ``auto`` resolved to)."""
    return type(model.layers[0].self_attention.core_attention).__name__ if len(model.layers) else None


def recompute_decision(model: torch.nn.Module) -> dict:
    """``recompute=auto``'s measured block memory, prediction and choice (empty otherwise)."""
    auto = getattr(model, "auto_recompute", None)
    return {"recompute_decision": auto.decision} if auto is not None else {}


def official_process_case(config: RunConfig, what: dict, micro_batch_size: int) -> PlainCase:
    """What ``--row-process official`` takes from our row: our initial weights (without our
    trainer: its gradient buffers and master weights would stay in the official step's peak
    memory), the inputs and the target, on the device and in the dtype our row uses."""
    model_config, weights = initial_weights(config)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    batch, target = random_batch(model_config, what["frames"], what["height"], what["width"], micro_batch_size,
                                 device, torch.bfloat16 if model_config.bf16 else torch.float32, config.train.seed)
    return PlainCase(model_config, weights, batch, target, config.optimizer, recomputes_whole_blocks(what["recompute"]))


def our_step(trainer: Trainer, batch: dict, target: torch.Tensor, seq_length: int, micro_batch_size: int,
             cuda_graph: str) -> tuple:
    """One training step of ``trainer`` on ``batch`` (under megatron's full-iteration CUDA graph
    with ``cuda_graph=full_iteration``), and the list it appends each step's loss to."""
    def forward_step(data_iterator, model):
        return model(**next(data_iterator)), lambda output: velocity_loss(output, target)

    losses = []
    forward_backward = get_forward_backward_func()
    if cuda_graph == "full_iteration":
        forward_backward = full_iteration_graph(forward_backward, trainer.config.train.seed)
        batch["text_mask"] = None  # all ones, which the model drops anyway, but only after a host sync

    def step():
        for chunk in trainer.ddp:
            chunk.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        reported = forward_backward(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=trainer.ddp, num_microbatches=1,
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False,
        )
        loss = reported[0]["loss"] if reported else torch.zeros((), device=trainer.device)
        finite, _, grad_norm = finite_and_stop(loss.view(1), prepare_update(trainer.optimizer), False)  # one read
        if finite:
            apply_update(trainer.optimizer, grad_norm)
            after_optimizer_step(trainer.model)
        losses.append(loss.clone())  # a copy: a replayed graph rewrites its output in place

    return step, losses


def profile_one(args, layout: Layout, what: dict) -> tuple[dict, PlainCase | None]:
    """Our row (``what`` names it), and with --compare-plain or --compare-official what the plain
    or official step of the row needs (only that under ``--row-process official``).

    A full-iteration graph's row runs on a side stream from the start: DDP keeps each weight's
    gradient accumulator on the stream current when it was built, and a capture cannot make the
    legacy default stream wait on it (an H200 row failed so, session 11)."""
    graphed = what["cuda_graph"] == "full_iteration" and torch.cuda.is_available()
    with torch.cuda.stream(torch.cuda.Stream()) if graphed else contextlib.nullcontext():
        return _profile_row(args, layout, what)


def _profile_row(args, layout: Layout, what: dict) -> tuple[dict, PlainCase | None]:
    frames, height, width = what["frames"], what["height"], what["width"]
    config = row_config(args, layout, what)
    if args.row_process == "official":
        return {}, official_process_case(config, what, args.micro_batch_size)
    trainer = setup(config)
    batch, target = random_batch(trainer.model_config, frames, height, width, args.micro_batch_size, trainer.device,
                                 trainer.dtype, config.train.seed)
    # under --isolate-rows the official step runs in its own process, not again after ours
    wants_case = args.compare_plain or (args.compare_official and args.row_process != "ours")
    plain = (PlainCase.before_training(trainer, batch, target, recomputes_whole_blocks(what["recompute"]))
             if wants_case else None)
    grid = token_grid(latent_shape(frames, height, width)[1:], trainer.model_config.patch_size)
    step, losses = our_step(trainer, batch, target, trainer.model[0].pipeline_seq_length(grid),
                            args.micro_batch_size, what["cuda_graph"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, args.iterations, args.warmup)
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    data_parallel = data_parallel_size(layout)
    step_losses = launch_losses(losses[-args.iterations:], layout.tp * layout.cp * data_parallel)
    trace = args.kernel_trace / f"{'_'.join(str(value) for value in what.values())}.json" if args.kernel_trace else None
    breakdown = kernel_breakdown(step, trace=trace) if args.kernel_breakdown else {}
    row = {
        **what, "tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": data_parallel,
        "tokens": clip_tokens(frames, height, width),
        "core_attention": core_attention_name(trainer.model[0]), **recompute_decision(trainer.model[0]),
        "backend": args.backend, "micro_batch_size": args.micro_batch_size,
    }
    row.update(speed_columns(args, trainer, row, seconds, peak_memory))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {**row, "losses": step_losses, "device": device, "megatron_core": megatron.core.__version__,
            **breakdown}, plain


def speed_columns(args, trainer: Trainer, row: dict, seconds: float, peak_memory: float | None) -> dict:
    """Throughput, TFLOP/s, MFU (against the bf16 peak for fp8 rows too), peak memory and the
    roofline of the row's step, timed at ``seconds``."""
    precision, tokens = row["precision"], row["tokens"]
    samples = args.micro_batch_size * row["dp"]  # per step, over the whole launch
    latent = latent_shape(row["frames"], row["height"], row["width"])[1:]
    flops = training_flops(trainer.model_config, latent, TEXT_TOKENS) * samples
    tflops = flops / seconds / world_size() / 1e12
    peak, peak_name = gpu_peak_tflops("bf16" if precision == "fp8" else precision, args.peak_tflops)
    fp8_peak = gpu_peak_tflops("fp8", args.peak_tflops)[0] if precision == "fp8" else None
    roofline = kernel_roofline_seconds(trainer.model_config, tokens, args.micro_batch_size, trainer.dtype,
                                       trainer.device, max(3, args.iterations))
    return {
        "step_s": seconds, "tokens_per_s": tokens * samples / seconds,
        "samples_per_s": samples / seconds, "flops_per_step": flops,
        "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None, "peak_tflops": peak, "peak": peak_name,
        "fp8_peak_fraction": tflops / fp8_peak if fp8_peak else None,
        "peak_memory_gib": peak_memory, "roofline_s": roofline, "roofline_ratio": seconds / roofline,
    }
