"""The pretraining loop: megatron-core schedules, optimizer and DDP around the MfM DiT.

    validate config -> process groups -> model (DDP) -> optimizer + LR schedule -> EMA
    -> resume -> for each iteration: micro-batches -> forward/backward (megatron schedule)
       -> the next step's micro-batches -> finite check -> optimizer step -> EMA
       -> log / sample / save
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_mfm.config import RunConfig, config_to_dict
from megatron_mfm.encoders.interface import FrozenEncoders, build_encoders
from megatron_mfm.data.loader import SyntheticLoader
from megatron_mfm.data.packing import parts_of
from megatron_mfm.data.shards.streaming import ShardLoader
from megatron_mfm.data.synthetic import SyntheticVideoDataset
from megatron_mfm.diffusion.generation import SamplingConfig, generate, task_sample_for
from megatron_mfm.model.config import MfMConfig
from megatron_mfm.model.dit import ModelChunks
from megatron_mfm.model.geometry import latent_shape
from megatron_mfm.model.recompute_budget import after_optimizer_step, describe
from megatron_mfm.parallel.pipeline import PipelinedModel
from megatron_mfm.checkpoint.training_state import Checkpointer, TrainingState
from megatron_mfm.training.components import build_loader, build_model, build_optimizer, wrap_ddp
from megatron_mfm.training.ema import EMA
from megatron_mfm.training.flops import gpu_peak_tflops, training_flops
from megatron_mfm.training.logger import MetricsLogger
from megatron_mfm.training.observability import (IntervalMeter, ProfileWindow, StepResult, StepTimer, memory_gb,
                                                 phase, rank_spread, to_host)
from megatron_mfm.training.optimizer_step import apply_update, prepare_update
from megatron_mfm.training.schedule import batch_tokens, reduce_task_losses, run_schedule
from megatron_mfm.training.step import make_forward_step
from megatron_mfm.training.step_batches import StepBatch, StepBatches
from megatron_mfm.training.validation import validation_loss
from megatron_mfm.utils.media import contact_sheet, write_mp4, write_png



class TooManySkippedSteps(RuntimeError):
    """Loss or gradients were non-finite more often than ``train.max_skipped_steps``."""


@dataclass
class Trainer:
    """Everything one run holds; built by ``setup``."""

    config: RunConfig
    model_config: MfMConfig
    model: ModelChunks
    """This rank's model chunks (one unless parallel.virtual_pipeline_stages > 1)."""
    ddp: list[DistributedDataParallel]
    optimizer: object
    scheduler: OptimizerParamScheduler
    ema: EMA | None
    loader: SyntheticLoader | ShardLoader
    batches: StepBatches
    """The loader's batches step by step, the next fetched during the step before."""
    encoders: FrozenEncoders
    checkpointer: Checkpointer
    logger: MetricsLogger
    state: TrainingState
    device: torch.device
    dtype: torch.dtype


def setup(config: RunConfig) -> Trainer:
    """Validate, create process groups, build every component, resume if asked."""
    model_config, model = build_model(config)
    device = next(model[0].parameters()).device
    ddp = wrap_ddp(config, model_config, model)
    optimizer, scheduler = build_optimizer(config, model_config, ddp)
    dtype = torch.bfloat16 if model_config.bf16 else torch.float32
    loader = build_loader(config, dtype)
    trainer = Trainer(
        config=config, model_config=model_config, model=model, ddp=ddp, optimizer=optimizer, scheduler=scheduler,
        ema=EMA(model, config.train.ema_decay) if config.train.ema_decay > 0 else None, loader=loader,
        batches=StepBatches(loader, config.data.packing.token_budget),
        encoders=build_encoders(config.encoders, model_config.text_hidden_size, device),
        checkpointer=Checkpointer(config.checkpoint.save, config.checkpoint.keep_last, config.checkpoint.async_save,
                                  config.parallel.distributed_optimizer, config.checkpoint.reshardable_optimizer),
        logger=MetricsLogger(config.logging, config_to_dict(config), config.train.iterations),
        state=TrainingState(), device=device,
        dtype=dtype,
    )
    if config.checkpoint.load:
        iteration = trainer.checkpointer.load(config.checkpoint.load, model, optimizer, scheduler, trainer.ema,
                                              loader, trainer.state)
        trainer.state.iteration = iteration
        trainer.logger.print(f"resumed from {config.checkpoint.load} at iteration {iteration}" if iteration else
                             f"checkpoint.load={config.checkpoint.load}: no complete checkpoint there, starting from scratch")
    return trainer


def finite_and_stop(task_losses: torch.Tensor, grad_norm: torch.Tensor,
                    stop_requested: bool) -> tuple[bool, bool, float]:
    """(loss and gradients finite on every rank, some rank asked to stop, the gradient norm):
    one all-reduce and the step's one host read, which precedes the update. The norm (the same
    on every rank) is non-finite when any gradient is (``optimizer_step.prepare_update``)."""
    finite = task_losses.isfinite().all() & grad_norm.isfinite()
    flags = torch.stack([finite.double(), torch.tensor(float(not stop_requested), device=task_losses.device),
                         grad_norm.double()])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    finite, go_on, norm = to_host(flags).tolist()
    return finite == 1.0, go_on == 0.0, norm


def _step_totals(trainer: Trainer, batch: StepBatch) -> tuple[int, int]:
    """FLOPs and video tokens of the whole step, summed over data-parallel ranks (token-budget
    micro-batches differ in size between ranks); also sums the ranks' skipped-sample and
    sidecar-miss counts. Host values, summed over the CPU (gloo) group: no wait for the GPU."""
    flops = sum(training_flops(trainer.model_config, latent_shape(*part.pixels.shape[2:])[1:],
                               trainer.encoders.text.max_length) * len(part.prompts)
                for mb in batch.micro_batches for part in parts_of(mb))
    tokens = sum(batch_tokens(mb) for mb in batch.micro_batches)
    totals = [flops, tokens, batch.skipped_samples, batch.sidecar_misses]
    if parallel_state.get_data_parallel_world_size() > 1:
        summed = torch.tensor(totals, dtype=torch.float64)
        dist.all_reduce(summed, group=parallel_state.get_data_parallel_group_gloo())
        totals = [int(value) for value in summed.tolist()]
    trainer.state.skipped_samples, trainer.state.sidecar_misses = totals[2], totals[3]
    return totals[0], totals[1]


def train_step(trainer: Trainer, stop_requested: bool = False, fetch_next: bool = False) -> StepResult:
    """One optimizer step. Each micro-batch's mean loss is weighted by its share of the step's
    video tokens (images and clips of several sizes count by their tokens, not equally).
    ``stop_requested``: this rank's SIGTERM, agreed over ranks with the finite check.
    ``fetch_next``: a step follows; its batch is fetched while the device runs this step's backward."""
    config, ddp = trainer.config, trainer.ddp
    batch = trainer.batches.next()
    micro_batches = batch.micro_batches
    for chunk in ddp:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    flops, tokens = _step_totals(trainer, batch)
    # megatron divides by the micro-batches, DDP averages over DP: this weight undoes both
    slots = len(micro_batches) * parallel_state.get_data_parallel_world_size()
    forward_step = make_forward_step(trainer.encoders, config.flow_matching, config.train.seed,
                                     trainer.model_config.patch_size, trainer.dtype, trainer.device,
                                     weight=lambda mb: batch_tokens(mb) * slots / tokens)
    with phase("forward-backward"):
        reports = run_schedule(config, ddp, micro_batches, forward_step, forward_only=False)
    task_losses = reduce_task_losses(reports, trainer.device)
    with phase("optimizer"):
        grad_norm = prepare_update(trainer.optimizer)
    if fetch_next:
        trainer.batches.fetch_ahead()
    with phase("skip decision"):
        finite, stop, grad_norm = finite_and_stop(task_losses, grad_norm, stop_requested)
    result = partial(StepResult, task_losses, flops=flops, tokens=tokens, data_seconds=batch.fetch_seconds, stop=stop)
    if not finite:
        trainer.state.skipped_steps += 1
        if trainer.state.skipped_steps > config.train.max_skipped_steps:
            raise TooManySkippedSteps(
                f"{trainer.state.skipped_steps} steps had non-finite loss or gradients "
                f"(train.max_skipped_steps={config.train.max_skipped_steps})"
            )
        trainer.scheduler.step(increment=config.train.global_batch_size)
        return result(None, False)
    with phase("optimizer"):
        apply_update(trainer.optimizer, grad_norm)
        for decision in after_optimizer_step(trainer.model):
            trainer.logger.print(describe(decision))
        trainer.scheduler.step(increment=config.train.global_batch_size)
        if trainer.ema is not None:
            trainer.ema.update(trainer.state.iteration)
    return result(grad_norm, True)


def _metrics(trainer: Trainer, meter: IntervalMeter) -> dict:
    """The iteration line: the interval's averages, the run's totals, rank spread, memory
    (collective)."""
    config = trainer.config
    peak, _ = gpu_peak_tflops("bf16", config.logging.peak_tflops)
    metrics = {
        "consumed samples": trainer.batches.consumed_samples,
        "learning rate": trainer.optimizer.param_groups[0]["lr"],
        **meter.averages(dist.get_world_size(), peak),
        "skipped steps": trainer.state.skipped_steps,
        "skipped samples": trainer.state.skipped_samples,
        "sidecar misses": trainer.state.sidecar_misses,
        # clips shorter than every frame count of their stage, passed over by the planner
        "too-short clips": (trainer.batches.loader_state()["planner"]["too_short"]
                            if isinstance(trainer.loader, ShardLoader) else 0),
        **rank_spread(meter.seconds / meter.steps, meter.data_seconds / meter.steps, trainer.device),
        **memory_gb(),
    }
    return metrics


def sample_validation(trainer: Trainer, iteration: int) -> list[Path]:
    """Fixed t2v and i2v samples (EMA weights when kept) written as mp4 + a contact sheet."""
    config = trainer.config
    out_dir = Path(config.logging.sample_dir or Path(config.checkpoint.save or ".") / "samples")
    dataset = SyntheticVideoDataset(config.data.synthetic)
    reference = dataset.clip(10**6, is_image=False)  # outside the training indices' usual range
    chunks = trainer.model
    model = chunks[0] if config.parallel.pipeline_parallel == 1 else PipelinedModel(chunks)
    saved = None
    if trainer.ema is not None:
        saved = {n: p.detach().clone() for n, p in chunks.named_parameters()}
        trainer.ema.copy_to_model()
    chunks.eval()
    sampling = SamplingConfig(steps=config.logging.sample_steps, guidance_scale=config.logging.guidance_scale,
                              schedule=config.logging.sample_schedule, shift=config.logging.sample_shift)
    clips, paths = [], []
    try:
        for task in ("t2v", "i2v"):
            clip = generate(model, trainer.encoders, task_sample_for(reference, task), sampling, trainer.dtype)
            clips.append(clip)
            if dist.get_rank() == 0:
                paths.append(write_mp4(out_dir / f"iter_{iteration:07d}_{task}.mp4", clip, reference.fps))
    finally:
        chunks.train()
        if saved is not None:
            with torch.no_grad():
                for name, param in chunks.named_parameters():
                    param.copy_(saved[name])
    if dist.get_rank() == 0:
        sheet = contact_sheet([reference.pixels] + clips)
        paths.append(write_png(out_dir / f"iter_{iteration:07d}_sheet.png", sheet))
        trainer.logger.log_image("samples (reference, t2v, i2v)", sheet, iteration)
    return paths


class _StopFlag:
    """Set by SIGTERM (a scheduler's pre-emption notice): save and stop. Read with the next
    step's finite check (no collective of its own), so the run stops after at most one more step."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def save(trainer: Trainer) -> None:
    trainer.checkpointer.save(
        trainer.state.iteration, trainer.model, trainer.optimizer, trainer.scheduler, trainer.ema,
        trainer.batches.loader_state(), trainer.state, config_to_dict(trainer.config),
    )


def train(config: RunConfig) -> Trainer:
    """Run (or resume) training to ``train.iterations``; returns the trainer."""
    trainer = setup(config)
    trainer.logger.print(
        f"training {config.model.preset}: {sum(p.numel() for p in trainer.model.parameters()):,} parameters on this "
        f"rank, world size {dist.get_world_size()}, tp {config.parallel.tensor_parallel}, "
        f"pp {config.parallel.pipeline_parallel}, cp {config.parallel.context_parallel}, "
        f"dp {parallel_state.get_data_parallel_world_size()}"
    )
    try:
        _train_loop(trainer)
    finally:
        trainer.checkpointer.wait()
        _report_saves(trainer)
        trainer.logger.close()
        trainer.loader.close()
    return trainer


def _report_saves(trainer: Trainer) -> None:
    """Log the checkpoints published since the last call (time, size, throughput)."""
    for report in trainer.checkpointer.take_finished():
        trainer.logger.log_event(report.iteration, "checkpoint saved", report.metrics())


def _train_loop(trainer: Trainer) -> None:
    config = trainer.config
    stop = _StopFlag()
    log, ckpt, validation = config.logging, config.checkpoint, config.validation
    profile = ProfileWindow(log, dist.get_rank(), Path(log.profile_dir or Path(ckpt.save or ".") / "profile"))
    for chunk in trainer.ddp:
        chunk.train()
    first_iteration = trainer.state.iteration
    last_iteration = min(config.train.iterations, config.train.stop_iteration or config.train.iterations)
    meter, timer = IntervalMeter(), StepTimer()
    while trainer.state.iteration < last_iteration:
        profile.before_step(trainer.state.iteration + 1)
        timer.start()
        result = train_step(trainer, stop.requested, fetch_next=trainer.state.iteration + 1 < last_iteration)
        timer.stop()
        trainer.state.iteration += 1
        iteration = trainer.state.iteration
        meter.add(result)
        with phase("checkpoint"):
            trainer.checkpointer.poll()
        _report_saves(trainer)
        if iteration % log.interval == 0:
            meter.seconds = timer.take_seconds()
            trainer.logger.log(iteration, _metrics(trainer, meter))
            meter = IntervalMeter()
        if validation.interval and iteration % validation.interval == 0:
            with phase("validation"):
                trainer.logger.log_event(iteration, "validation", validation_loss(trainer))
        if log.sample_interval and iteration % log.sample_interval == 0:
            sample_validation(trainer, iteration)
        stopping = result.stop
        if ckpt.save and (stopping or (ckpt.interval and iteration % ckpt.interval == 0)):
            with phase("checkpoint"):
                save(trainer)
            _report_saves(trainer)
        profile.after_step(iteration)
        if stopping:
            trainer.logger.print(f"SIGTERM: saved iteration {iteration} and stopped" if ckpt.save else
                                 f"SIGTERM: stopped at iteration {iteration}; nothing saved (checkpoint.save is empty)")
            break
    else:
        saved_already = ckpt.interval and trainer.state.iteration % ckpt.interval == 0
        if ckpt.save and trainer.state.iteration > first_iteration and not saved_already:
            save(trainer)
    profile.close()
