"""Training micro-batches from webdataset shards: planned from the catalog, decoded by workers.

    catalog (metadata) -> planner (whole step, all DP ranks) -> this rank's micro-batches
    -> worker processes: read bytes by offset, decode + resize/crop to the bucket, build the
       task sample -> prefetched, consumed in plan order

Workers only decode: what a step contains is decided in the main process, so the number of
workers or their speed never changes the data. The checkpointed state is the planner's state
before the first step not yet trained on; prefetched steps are planned again after a resume.

A decoded micro-batch travels from a worker in the smallest form that gives back its float
tensors bit for bit (``pack_frames``): pixels as uint8 when every value is an 8-bit level (clips
whose resize is the identity; a real resize leaves values between levels, which stay float32),
the condition's mask as uint8, its RGB part dropped when it is pixels * mask (all tasks but the
degradations) and its depth dropped when zero (real media: the step estimates it).
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatron_mfm.data.shards.buckets import Bucket
from megatron_mfm.data.shards.catalog import SampleEntry, load_catalog, read_sample
from megatron_mfm.data.decode.dali import DALI_INSTALL, DECODE_BACKENDS, DecodeFn, decode_backend
from megatron_mfm.data.decode.pyav import MediaError
from megatron_mfm.data.batch import MicroBatch, collate
from megatron_mfm.data.rng import Stream, sample_generator
from megatron_mfm.data.shards.planner import MicroBatchPlanner
from megatron_mfm.data.shards.precomputed import SidecarSettings, lookup
from megatron_mfm.data.shards.stages import StageConfig, StageSchedule
from megatron_mfm.tasks.builders import IMAGE_TASKS, VIDEO_TASKS, Clip
from megatron_mfm.tasks.mixture import TaskMixture, TaskMixtureConfig
from megatron_mfm.utils.preemption import children_shielded

log = logging.getLogger(__name__)


@dataclass
class ShardDataConfig:
    path: str = ""
    """Directory written by data_prep/make_shards.py (index.json + shards)."""
    fps: float = 16.0
    """Frame rate clips are resampled to."""
    shuffle_window: int = 1024
    """Samples shuffled together (the deterministic shuffle buffer)."""
    workers: int = 2
    """Decoding processes per rank (0: decode in the training process)."""
    prefetch_steps: int = 2
    """Steps decoded ahead of the one training."""
    decode_backend: str = "pyav"
    """pyav (CPU, any codec) or dali (NVDEC on this rank's GPU: H.264/HEVC; DALI's CPU decoder
    takes VP8/VP9/MJPEG only). Each worker process builds its own decoder."""
    precomputed: str = ""
    """Folder of data_prep/encode_shards.py sidecars of these shards: the step takes their VAE
    latents and T5 states instead of encoding, for the samples decoded exactly as they were
    encoded; '' encodes every sample in the step."""

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.shuffle_window < 1 or self.workers < 0 or self.prefetch_steps < 0:
            raise ValueError("data.shards: need fps > 0, shuffle_window >= 1, workers >= 0, prefetch_steps >= 0")
        if self.precomputed:
            SidecarSettings.load(self.precomputed)  # a missing folder fails with the config, not at the loader
        if self.decode_backend not in DECODE_BACKENDS:
            raise ValueError(f"data.shards.decode_backend={self.decode_backend!r}: choose one of {DECODE_BACKENDS}")
        if self.decode_backend == "dali" and importlib.util.find_spec("nvidia.dali") is None:
            raise ValueError(f"data.shards.decode_backend=dali: NVIDIA DALI is not installed ({DALI_INSTALL})")


@dataclass
class DecodeJob:
    """Everything a worker needs to produce one micro-batch (picklable)."""

    directory: str
    entries: list[SampleEntry]
    sample_ids: list[int]
    bucket: Bucket
    fps: float
    tasks: TaskMixtureConfig
    seed: int
    backend: str
    sidecars: SidecarSettings | None = None


PIXEL_LEVELS = (127.5, 1.0)
"""uint8 k stands for k / 127.5 - 1: the decoders' own mapping of 8-bit values to [-1, 1]."""
MASK_LEVELS = (1.0, 0.0)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Float32 tensors equal bit for bit (-0.0 differs from 0.0)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _widen(x: torch.Tensor, levels: tuple[float, float]) -> torch.Tensor:
    scale, offset = levels
    return x.float() / scale - offset if x.dtype == torch.uint8 else x


def _narrow(x: torch.Tensor, levels: tuple[float, float]) -> torch.Tensor:
    """Float32 ``x`` as uint8 when ``_widen`` gives it back bit for bit, else a copy of ``x`` (a
    view would take its whole storage along)."""
    scale, offset = levels
    levels_of_x = ((x + offset) * scale).round().clamp(0, 255).to(torch.uint8)
    return levels_of_x if _same_bits(_widen(levels_of_x, levels), x) else x.clone()


def pack_frames(pixels: torch.Tensor, condition: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """(B, 3, F, H, W) pixels and (B, 5, F, H, W) condition in the smallest exact form."""
    mask, depth, rgb = condition[:, 4:5], condition[:, 3:4], condition[:, :3]
    return {
        "pixels": _narrow(pixels, PIXEL_LEVELS),
        "mask": _narrow(mask, MASK_LEVELS),
        "rgb": None if _same_bits(rgb, pixels * mask) else _narrow(rgb, PIXEL_LEVELS),
        "depth": depth.clone() if depth.view(torch.int32).any() else None,
    }


def unpack_frames(packed: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 pixels and condition ``pack_frames`` was given, bit for bit."""
    pixels, mask = _widen(packed["pixels"], PIXEL_LEVELS), _widen(packed["mask"], MASK_LEVELS)
    rgb = pixels * mask if packed["rgb"] is None else _widen(packed["rgb"], PIXEL_LEVELS)
    depth = torch.zeros_like(mask) if packed["depth"] is None else packed["depth"]
    return pixels, torch.cat([rgb, depth, mask], dim=1)


@dataclass
class DecodedMicroBatch:
    batch: MicroBatch | None
    """None when no sample of it could be decoded."""
    failures: list[str]
    """``shard/key: reason`` of samples that could not be decoded (replaced by a good one)."""
    sidecar_misses: list[tuple[str, str]]
    """(reason, detail) per sample part the step encodes although sidecars are configured."""

    def __getstate__(self) -> dict:
        """Pickled for the trip from a worker: frames packed (``pack_frames``)."""
        state = dict(vars(self))
        if self.batch is not None:
            fields = dict(vars(self.batch))
            fields["frames"] = pack_frames(fields.pop("pixels"), fields.pop("condition"))
            state["batch"] = fields
        return state

    def __setstate__(self, state: dict) -> None:
        """Unpacked in the training process (the pool's result thread, beside training)."""
        if state["batch"] is not None:
            fields = dict(state["batch"])
            fields["pixels"], fields["condition"] = unpack_frames(fields.pop("frames"))
            state["batch"] = MicroBatch(**fields)
        vars(self).update(state)


_decoders: dict[str, DecodeFn] = {}


def _decoder(backend: str) -> DecodeFn:
    """This process's decoder of ``backend``, built once (DALI pipelines are reused)."""
    if backend not in _decoders:
        _decoders[backend] = decode_backend(backend, flag="data.shards.decode_backend")
    return _decoders[backend]


def decode_micro_batch(job: DecodeJob) -> DecodedMicroBatch:
    """Decode, resize/crop to the bucket, build task samples and look up their sidecars. An
    undecodable sample is replaced by a decodable one of the same micro-batch (shapes stay
    fixed) and reported."""
    clips: list[tuple[SampleEntry, Clip] | None] = []
    failures = []
    for entry in job.entries:
        try:
            media, record = read_sample(job.directory, entry)
            decode = _decoder(job.backend)
            pixels = decode(media, entry.media_name, job.bucket.frames, job.bucket.height, job.bucket.width,
                            None if entry.is_image else job.fps).cpu()  # NVDEC output joins the CPU task builders
            clips.append((entry, Clip(pixels=pixels, caption=record["caption"], fps=job.fps, key=entry.key)))
        except (MediaError, ValueError, OSError) as error:
            clips.append(None)
            failures.append(f"{entry.shard}/{entry.key}: {error}")
    good = [c for c in clips if c is not None]
    if not good:
        return DecodedMicroBatch(None, failures, [])
    mixture = TaskMixture(job.tasks)
    chosen = [clip or good[n % len(good)] for n, clip in enumerate(clips)]
    samples = [mixture.sample(clip, sample_generator(job.seed, sample_id, Stream.TASK))
               for (_, clip), sample_id in zip(chosen, job.sample_ids)]
    batch, misses = collate(samples, job.sample_ids), []
    if job.sidecars is not None:
        found = [lookup(job.sidecars, entry, job.bucket, job.fps, sample.prompt)
                 for (entry, _), sample in zip(chosen, samples)]
        batch.precomputed = [precomputed for precomputed, _ in found]
        misses = [miss for _, sample_misses in found for miss in sample_misses]
    return DecodedMicroBatch(batch, failures, misses)


def _check_tasks_fit(catalog: list[SampleEntry], stages: list[StageConfig], tasks: list[TaskMixtureConfig]) -> None:
    """Every stage must have a task for every kind of media in the shards (else the first such
    sample would stop training)."""
    kinds = {entry.kind for entry in catalog}
    for stage, mixture in zip(stages, tasks):
        for kind in sorted(kinds):
            fitting = IMAGE_TASKS if kind == "image" else VIDEO_TASKS
            if not any(mixture.weights.get(t, 0) > 0 for t in fitting):
                raise ValueError(f"data.stages[{stage.name}]: the shards hold {kind}s but no {kind} task has weight "
                                 f"(tasks.weights / task_weights; {kind} tasks: {list(fitting)})")


class ShardLoader:
    """This data-parallel rank's micro-batches of each step, from shards (same interface as
    ``SyntheticLoader``)."""

    def __init__(self, config: ShardDataConfig, stages: list[StageConfig], tasks: TaskMixtureConfig,
                 micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch size must be a multiple of micro batch size x DP size")
        self.config, self.dp_rank, self.dp_size, self.seed = config, dp_rank, dp_size, seed
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self.stage_tasks = [replace(tasks, weights=s.task_weights) if s.task_weights else tasks for s in stages]
        catalog = load_catalog(config.path)
        _check_tasks_fit(catalog, stages, self.stage_tasks)
        self.sidecars = SidecarSettings.load(config.precomputed) if config.precomputed else None
        if self.sidecars is not None:
            self.sidecars.check(stages, config.fps, any(not entry.is_image for entry in catalog))
        self.planner = MicroBatchPlanner(catalog, StageSchedule(stages), seed, config.fps, config.shuffle_window,
                                         micro_batch_size)
        self.consumed_samples = 0
        self.skipped_samples = 0
        """Samples of this rank that failed to decode (each replaced, logged)."""
        self.sidecar_misses: Counter[str] = Counter()
        """Sample parts of this rank encoded in the step although sidecars are configured, by
        reason (``precomputed.lookup``); missing and corrupt ones are also logged."""
        self._pool = (ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=torch.set_num_threads, initargs=(1,))
                      if config.workers else None)  # one thread each: the workers are the parallelism
        self._queue: deque[tuple[dict, int, list[Future | DecodedMicroBatch]]] = deque()
        self._last_good: MicroBatch | None = None

    def _submit(self, job: DecodeJob) -> Future | DecodedMicroBatch:
        if self._pool is None:
            return decode_micro_batch(job)
        with children_shielded():  # a submit may start a worker (see utils/preemption.py)
            return self._pool.submit(decode_micro_batch, job)

    def _plan_ahead(self) -> None:
        while len(self._queue) < self.config.prefetch_steps + 1:
            before = self.planner.state_dict()
            step = self.planner.plan_step(self.num_microbatches * self.dp_size)
            jobs = [
                self._submit(DecodeJob(str(Path(self.config.path)), [self.planner.catalog[i] for i in mb.entries],
                                       mb.sample_ids, mb.bucket, self.config.fps, self.stage_tasks[mb.stage],
                                       self.seed, self.config.decode_backend, self.sidecars))
                for mb in step[self.dp_rank::self.dp_size]
            ]
            self._queue.append((before, sum(len(mb.entries) for mb in step), jobs))

    def next_global_batch(self) -> list[MicroBatch]:
        """This rank's micro-batches for the next step (blocks on decoding if behind)."""
        self._plan_ahead()
        _, samples, jobs = self._queue.popleft()
        decoded = [job.result() if isinstance(job, Future) else job for job in jobs]
        for result in decoded:
            for failure in result.failures:
                log.warning("skipped undecodable sample %s", failure)
            self.skipped_samples += len(result.failures)
            for reason, detail in result.sidecar_misses:
                self.sidecar_misses[reason] += 1
                if detail:
                    log.warning("sidecar %s, encoding in the step: %s", reason, detail)
        self.consumed_samples += samples
        self._plan_ahead()
        return [self._decodable(result, decoded) for result in decoded]

    def _decodable(self, result: DecodedMicroBatch, step: list[DecodedMicroBatch]) -> MicroBatch:
        """A micro-batch whose every sample failed is replaced by another of the step, else by
        this rank's previous one: the step keeps its size, the failures are counted."""
        if result.batch is not None:
            self._last_good = result.batch
            return result.batch
        fallback = next((r.batch for r in step if r.batch is not None), self._last_good)
        if fallback is None:
            raise MediaError("no sample of this rank's first micro-batch could be decoded: " + "; ".join(result.failures))
        return fallback

    def state_dict(self) -> dict:
        planner = self._queue[0][0] if self._queue else self.planner.state_dict()
        return {"planner": planner, "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        if "planner" not in state:
            raise ValueError("the checkpoint's data state is not from data.source=shards (it cannot resume a shard run)")
        for _, _, jobs in self._queue:
            for job in jobs:
                if isinstance(job, Future):
                    job.cancel()
        self._queue.clear()
        self.planner.load_state_dict(state["planner"])
        self.consumed_samples = int(state["consumed_samples"])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
