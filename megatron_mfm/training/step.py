"""One micro-batch: encode, noise, predict the velocity, and the loss megatron schedules call."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from megatron_mfm.data.batch import MicroBatch
from megatron_mfm.data.packing import PackedMicroBatch
from megatron_mfm.data.rng import Stream, sample_generators
from megatron_mfm.data.shards.precomputed import Precomputed
from megatron_mfm.diffusion.flow_matching import FlowMatchingConfig, add_noise, per_sample_mse, sample_sigmas
from megatron_mfm.encoders.interface import FrozenEncoders
from megatron_mfm.model.geometry import token_grid
from megatron_mfm.tasks.builders import TASKS

TASK_ROWS = {task: row for row, task in enumerate(TASKS)}


def noise_and_sigma(latents: torch.Tensor, sample_ids: torch.Tensor, seed: int, flow: FlowMatchingConfig,
                    tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise and sigma from the sample's own generators (layout-independent), at one
    torch op a sample for each (a batch of 256 spent ~40 ms of host time at ~10 ops a sample)."""
    ids = sample_ids.tolist()
    # page-locked for a GPU: its copy is then asynchronous (pageable, 3 MB held an H200 step ~6 ms)
    noise = torch.empty(len(ids), *latents.shape[1:], pin_memory=latents.is_cuda)
    for row, generator in zip(noise.unbind(), sample_generators(seed, ids, Stream.NOISE)):
        row.normal_(generator=generator)  # what torch.randn(row.shape, generator=generator) draws
    sigma = sample_sigmas(flow, tokens, sample_generators(seed, ids, Stream.SIGMA))
    return noise.to(latents.device, non_blocking=True), sigma.to(latents.device, non_blocking=True)


def task_loss_report(per_sample: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """(2, num_tasks): summed loss and sample count per task, in TASKS order."""
    rows = torch.tensor([TASK_ROWS[task] for task in tasks]).to(per_sample.device, non_blocking=True)
    report = torch.zeros(2, len(TASKS), device=per_sample.device)
    report[0].index_add_(0, rows, per_sample.detach().float())  # in sample order on the CPU, as a loop
    report[1].index_add_(0, rows, torch.ones_like(report[1, :1]).expand(len(tasks)))
    return report


def _loss(target: torch.Tensor, tasks: list[str], weight: float, output: torch.Tensor):
    per_sample = per_sample_mse(output, target)
    return per_sample.mean() * weight, {"task_loss": task_loss_report(per_sample, tasks)}


def merge_encoded(given: list[tuple[torch.Tensor, ...] | None], encode: Callable[[list[int]], tuple[torch.Tensor, ...]],
                  device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-sample precomputed tensors stacked as float32 on ``device``, the samples without them
    encoded in one batch by ``encode(rows)`` (all rows: its output as it is)."""
    missing = [i for i, parts in enumerate(given) if parts is None]
    if len(missing) == len(given):
        return encode(missing)
    encoded = zip(*encode(missing)) if missing else iter(())
    rows = [next(encoded) if parts is None else tuple(p.to(device).float() for p in parts) for parts in given]
    return tuple(torch.stack(column) for column in zip(*rows))


def _latents(encoders: FrozenEncoders, batch: MicroBatch, pixels: torch.Tensor | None, seed: int,
             device: torch.device) -> torch.Tensor:
    """(B, C, T, H/8, W/8): the sidecar latents where the batch has them, else the VAE's of
    ``pixels`` (the batch's on ``device``; None when every sample has sidecar latents)."""

    def vae(rows: list[int]) -> tuple[torch.Tensor]:
        clips = pixels if len(rows) == len(pixels) else pixels[rows]
        ids = batch.sample_ids.tolist()
        return (encoders.encode_video(clips, sample_generators(seed, [ids[i] for i in rows], Stream.LATENT)),)

    return merge_encoded([None if p.latents is None else (p.latents,) for p in _precomputed(batch)], vae, device)[0]


def _text(encoders: FrozenEncoders, batch: MicroBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) states and (B, L) mask: the sidecar's where the batch has them, else T5's."""
    return merge_encoded([None if p.text is None else (p.text, p.text_mask) for p in _precomputed(batch)],
                         lambda rows: encoders.encode_text([batch.prompts[i] for i in rows], device), device)


def _precomputed(batch: MicroBatch) -> list[Precomputed]:
    return batch.precomputed or [Precomputed()] * len(batch.prompts)


def _condition(encoders: FrozenEncoders, batch: MicroBatch, pixels: torch.Tensor | None,
               device: torch.device) -> torch.Tensor:
    """The condition on ``device``; with ``pixels``, its revealed frames' depth estimated."""
    condition = batch.condition.to(device, non_blocking=True)
    if pixels is None:  # no depth to estimate: no copy of the condition
        return condition
    return torch.stack([encoders.with_estimated_depth(c, p, frames)
                        for c, p, frames in zip(condition, pixels, batch.depth_to_estimate)])


@dataclass
class Encoded:
    """One (one-shape) micro-batch made ready for the DiT, on the device."""

    noisy: torch.Tensor
    sigmas: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    condition: torch.Tensor | None
    """None on later pipeline stages (only the first embeds it)."""
    motion_score: torch.Tensor
    target: torch.Tensor


def _packed_text(parts: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts' text states and masks as one batch (padded to the longest, masked)."""
    length = max(part.text.shape[1] for part in parts)
    text = torch.cat([F.pad(part.text, (0, 0, 0, length - part.text.shape[1])) for part in parts])
    mask = torch.cat([F.pad(part.text_mask.bool(), (0, length - part.text.shape[1])) for part in parts])
    return text, mask


def _packed_loss(targets: list[torch.Tensor], tasks: list[str], weight: float, outputs: list[torch.Tensor]):
    """The token-weighted mean of the samples' losses (what they add to a bucketed step; a
    sample's latent elements are its tokens times a constant)."""
    per_sample = torch.cat([per_sample_mse(out, target) for out, target in zip(outputs, targets)])
    tokens = torch.cat([per_sample.new_full((t.shape[0],), float(t[0].numel())) for t in targets])
    loss = (per_sample * tokens).sum() / tokens.sum()
    return loss * weight, {"task_loss": task_loss_report(per_sample, tasks)}


def make_forward_step(encoders: FrozenEncoders, flow: FlowMatchingConfig, seed: int, patch_size: int,
                      dtype: torch.dtype, device: torch.device, sigma: float | None = None,
                      weight: Callable[[MicroBatch | PackedMicroBatch], float] | None = None) -> Callable:
    """The ``forward_step_func`` for megatron's ``get_forward_backward_func``. ``sigma``: one
    noise level for every sample instead of each sample's drawn one (validation); ``weight``:
    a micro-batch's factor on its mean loss (1 without). A ``PackedMicroBatch`` runs as one
    packed sequence, its loss the token-weighted mean of its samples'."""

    def encode(batch: MicroBatch, first_stage: bool) -> Encoded:
        # only the first pipeline stage embeds the condition (model/dit.py: pre_process); later
        # stages need the latents (shape, target) and the text
        estimate_depth = first_stage and encoders.depth is not None and any(batch.depth_to_estimate)
        encode_video = any(p.latents is None for p in _precomputed(batch))
        pixels = batch.pixels.to(device, non_blocking=True) if encode_video or estimate_depth else None
        latents = _latents(encoders, batch, pixels, seed, device)
        text, text_mask = _text(encoders, batch, device)
        condition = _condition(encoders, batch, pixels if estimate_depth else None, device) if first_stage else None
        tokens = math.prod(token_grid(latents.shape[2:], patch_size))
        noise, drawn = noise_and_sigma(latents, batch.sample_ids, seed, flow, tokens)
        sigmas = drawn if sigma is None else torch.full_like(drawn, sigma)
        noisy, target = add_noise(latents, noise, sigmas)
        motion_score = batch.motion_score.to(device, non_blocking=True)
        return Encoded(noisy.to(dtype), sigmas, text.to(dtype), text_mask,
                       None if condition is None else condition.to(dtype), motion_score, target)

    def forward_step(data_iterator: Iterator[MicroBatch | PackedMicroBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        first_stage = getattr(model, "module", model).pre_process
        factor = 1.0 if weight is None else weight(batch)
        if isinstance(batch, PackedMicroBatch):
            parts = [encode(part, first_stage) for part in batch.parts]
            text, text_mask = _packed_text(parts)
            output = model([p.noisy for p in parts], torch.cat([p.sigmas for p in parts]) * 1000.0, text, text_mask,
                           [p.condition for p in parts] if first_stage else None,
                           torch.cat([p.motion_score for p in parts]))
            return output, partial(_packed_loss, [p.target for p in parts], batch.tasks, factor)
        part = encode(batch, first_stage)
        output = model(part.noisy, part.sigmas * 1000.0, part.text, part.text_mask, part.condition, part.motion_score)
        return output, partial(_loss, part.target, batch.tasks, factor)

    return forward_step
