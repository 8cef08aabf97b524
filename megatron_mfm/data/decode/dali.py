"""Decoding clips with NVIDIA DALI, and the choice between the decode backends.

DALI decodes on the GPU (``device="gpu"``: NVDEC through DALI's "mixed" decoder, H.264/HEVC/AV1
and more) or on the CPU (libavcodec; VP8/VP9/MJPEG only, DALI's CPU decoder refuses H.264).
It keeps ``decode.decode_clip``'s contract: (3, F, height, width) float in [-1, 1], the same
source frames (``VideoTiming.source_frames``) and the same scale-to-cover + centre-crop window
(``decode.cover_crop_box``), so the loader can switch backends without changing a sample.

Differences from the PyAV backend, measured in tests/test_dali_decode.py:
- YUV -> RGB conversion and chroma upsampling are DALI's own, not swscale's;
- the crop is a region of interest of one antialiased linear resize (the same sampling
  positions and filter width as PyAV's resize-then-crop, but DALI's filter, not torch's);
- output tensors live on the decoding GPU for ``device="gpu"``.

DALI pays off with several clips per pipeline run: ``DaliDecoder.decode_batch`` takes a list and
returns one result per clip, a ``MediaError`` in place of a clip that failed, so one corrupt file
does not cost the loader the whole batch.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from megatron_mfm.data.decode.pyav import IMAGE_SUFFIXES, MediaError, cover_crop_box, decode_clip, video_timing

DALI_INSTALL = "pip install nvidia-dali-cuda130 (the 'dali' extra: pip install -e '.[dali]')"
DECODE_BACKENDS = ("pyav", "dali")
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}
CODEC_ALIASES = {"libdav1d": "av1", "libaom-av1": "av1", "libvpx": "vp8", "libvpx-vp9": "vp9"}
"""PyAV reports the decoder it would use; DALI cares about the codec."""


class DecodeFn(Protocol):
    """The decode contract of ``decode.decode_clip``, which every backend keeps."""

    def __call__(self, data: bytes, name: str, frames: int, height: int, width: int,
                 fps: float | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class ClipRequest:
    """One clip to decode: the arguments of ``decode_clip``."""

    data: bytes
    name: str
    frames: int
    height: int
    width: int
    fps: float | None = None


@dataclass(frozen=True)
class DaliDecodeConfig:
    """Where and how wide DALI decodes."""

    device: str = "gpu"
    """"gpu" (NVDEC through DALI's mixed decoder) or "cpu" (VP8/VP9/MJPEG only)."""
    device_id: int = 0
    """CUDA device of the GPU decoder and of its output tensors."""
    max_batch_size: int = 8
    """Clips per pipeline run; longer request lists are decoded in runs of this size."""
    num_threads: int = 2
    """DALI's CPU threads (demuxing, CPU decoding, resize on the CPU)."""

    def __post_init__(self) -> None:
        if self.device not in ("gpu", "cpu"):
            raise ValueError(f"DaliDecodeConfig.device: expected 'gpu' or 'cpu', got {self.device!r}")
        if self.max_batch_size < 1 or self.num_threads < 1:
            raise ValueError("DaliDecodeConfig.max_batch_size and .num_threads must be at least 1")

    @property
    def codecs(self) -> frozenset[str]:
        return GPU_CODECS if self.device == "gpu" else CPU_CODECS


@dataclass(frozen=True)
class _Plan:
    """What the pipeline needs besides the bytes, worked out on the host before decoding."""

    kind: str  # "video" or "image"
    indices: np.ndarray  # (F,) int32 source frame numbers; empty for images
    size: np.ndarray  # (2,) float32 output (height, width)
    roi_start: np.ndarray  # (2,) float32 (y, x) of the crop window in source pixels
    roi_end: np.ndarray


def _crop_roi(h: int, w: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The crop window of ``cover_crop_box`` in source pixels: resizing exactly this region to
    height x width samples the same positions as resizing the whole frame and cropping."""
    (resized_h, resized_w), top, left = cover_crop_box(h, w, height, width)
    scale = np.array([h / resized_h, w / resized_w], np.float32)
    return np.array([top, left], np.float32) * scale, np.array([top + height, left + width], np.float32) * scale


def _read_video_header(request: ClipRequest) -> tuple[str, list[int], int, int]:
    """(codec, source frames to decode, height, width) without decoding: demuxing costs a small
    fraction of decoding, and it finds short clips before DALI pads them."""
    import av

    try:
        timing = video_timing(request.data)
        with av.open(io.BytesIO(request.data)) as container:
            context = container.streams.video[0].codec_context
            codec, height, width = context.name, context.height, context.width
    except (av.FFmpegError, IndexError) as error:
        raise MediaError(f"{request.name}: not a readable video ({type(error).__name__}: {error})") from error
    return CODEC_ALIASES.get(codec, codec), timing.source_frames(request.frames, request.fps, request.name), height, width


def _plan(request: ClipRequest, config: DaliDecodeConfig) -> _Plan:
    """Check one request and work out its frames and crop window; raises ``MediaError``."""
    size = np.array([request.height, request.width], np.float32)
    if Path(request.name).suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(request.data)) as image:
                w, h = image.size
        except Exception as error:  # Pillow raises many types for bad bytes
            raise MediaError(f"{request.name}: not a readable image ({error})") from error
        return _Plan("image", np.zeros(0, np.int32), size, *_crop_roi(h, w, request.height, request.width))
    codec, indices, h, w = _read_video_header(request)
    if codec not in config.codecs:
        raise MediaError(f"{request.name}: codec {codec} cannot be decoded by DALI on the {config.device} "
                         f"(it decodes {', '.join(sorted(config.codecs))}); decode it on the GPU or with PyAV")
    return _Plan("video", np.array(indices, np.int32), size, *_crop_roi(h, w, request.height, request.width))


def _build_pipeline(kind: str, config: DaliDecodeConfig):
    """decode (video frames or image) -> one antialiased linear resize of the crop window, float."""
    from nvidia.dali import Pipeline, fn, types

    on_gpu = config.device == "gpu"
    pipe = Pipeline(batch_size=config.max_batch_size, num_threads=config.num_threads,
                    device_id=config.device_id if on_gpu else None, prefetch_queue_depth=1, exec_dynamic=True)
    decoder_device = "mixed" if on_gpu else "cpu"
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        if kind == "video":
            indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
            frames = fn.decoders.video(encoded, device=decoder_device, frames=indices)  # (F, h, w, 3) uint8
        else:
            frames = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)  # (h, w, 3)
        window = {arg: fn.external_source(name=arg, dtype=types.FLOAT, ndim=1)
                  for arg in ("size", "roi_start", "roi_end")}
        pipe.set_outputs(fn.resize(frames, **window, antialias=True, interp_type=types.INTERP_LINEAR,
                                   dtype=types.FLOAT))
    pipe.build()
    return pipe


def _to_clip(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """(F, H, W, 3) or (H, W, 3) float in [0, 255] -> (3, F, H, W) in [-1, 1]."""
    if kind == "image":
        pixels = pixels[None]
    return (pixels / 127.5 - 1).clamp(-1, 1).permute(3, 0, 1, 2).contiguous()


def _dali_reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong, not where the operator was defined."""
    text = str(error)
    lines = [line.strip() for line in text.partition("encountered:")[2].splitlines() if line.strip()]
    return lines[0] if lines else (text.strip().splitlines() or [type(error).__name__])[0]


class DaliDecoder:
    """Decodes clips with DALI pipelines built on first use (one per media kind) and reused.

    Pickles without its pipelines, so a loader can hand it to worker processes (start them with
    "spawn" for the GPU decoder: a forked child cannot use CUDA)."""

    def __init__(self, config: DaliDecodeConfig = DaliDecodeConfig()):
        self.config = config
        self._pipelines: dict[str, object] = {}

    def __getstate__(self) -> dict:
        return {"config": self.config, "_pipelines": {}}

    def __call__(self, data: bytes, name: str, frames: int, height: int, width: int,
                 fps: float | None = None) -> torch.Tensor:
        """The ``decode_clip`` contract for one clip; raises ``MediaError``."""
        (result,) = self.decode_batch([ClipRequest(data, name, frames, height, width, fps)])
        if isinstance(result, MediaError):
            raise result
        return result

    def decode_batch(self, requests: Sequence[ClipRequest]) -> list[torch.Tensor | MediaError]:
        """One (3, F, H, W) clip per request, in order, or the ``MediaError`` that request raised."""
        results: list[torch.Tensor | MediaError | None] = [None] * len(requests)
        planned: dict[str, list[tuple[int, _Plan]]] = {"video": [], "image": []}
        for position, request in enumerate(requests):
            try:
                plan = _plan(request, self.config)
            except MediaError as error:
                results[position] = error
                continue
            planned[plan.kind].append((position, plan))
        batch = self.config.max_batch_size
        for kind, items in planned.items():
            for start in range(0, len(items), batch):
                chunk = items[start:start + batch]
                decoded = self._run_isolating_failures(kind, [requests[position] for position, _ in chunk],
                                                       [plan for _, plan in chunk])
                for (position, _), result in zip(chunk, decoded):
                    results[position] = result
        return results

    def _run_isolating_failures(self, kind: str, requests: list[ClipRequest],
                                plans: list[_Plan]) -> list[torch.Tensor | MediaError]:
        """Run a batch; if DALI fails, drop the pipeline (DALI leaves it unusable) and decode the
        clips one by one to find which failed. Building a pipeline is outside the ``try``: a
        failure there is the setup's (no GPU, say), not a file's."""
        if kind not in self._pipelines:
            self._pipelines[kind] = _build_pipeline(kind, self.config)
        try:
            return self._run(self._pipelines[kind], kind, requests, plans)
        except (RuntimeError, IndexError) as error:  # DALI reports decoder failures as these
            self._pipelines.pop(kind, None)
            if len(requests) == 1:
                return [MediaError(f"{requests[0].name}: DALI could not decode it on the {self.config.device} "
                                   f"({_dali_reason(error)})")]
        return [result for request, plan in zip(requests, plans)
                for result in self._run_isolating_failures(kind, [request], [plan])]

    @staticmethod
    def _run(pipe, kind: str, requests: list[ClipRequest], plans: list[_Plan]) -> list[torch.Tensor]:
        pipe.feed_input("encoded", [np.frombuffer(request.data, np.uint8) for request in requests])
        if kind == "video":
            pipe.feed_input("indices", [plan.indices for plan in plans])
        for arg in ("size", "roi_start", "roi_end"):
            pipe.feed_input(arg, [getattr(plan, arg) for plan in plans])
        (output,) = pipe.run()
        return [_to_clip(torch.from_dlpack(output[i]), kind) for i in range(len(requests))]


def decode_backend(name: str, device: str | None = None, flag: str = "--decode-backend") -> DecodeFn:
    """The decode function of backend ``name`` ("pyav" or "dali"); ``device`` (DALI only):
    "gpu" or "cpu", by default the GPU when there is one. ``flag`` names the setting in errors."""
    if name == "pyav":
        return decode_clip
    if name != "dali":
        raise ValueError(f"{flag} {name!r}: expected one of {', '.join(DECODE_BACKENDS)}")
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{flag} dali needs NVIDIA DALI, which is not installed: {DALI_INSTALL}; "
                          f"or use {flag} pyav") from error
    device = device or ("gpu" if torch.cuda.is_available() else "cpu")
    # this rank's GPU: LOCAL_RANK reaches spawned loader workers too, where current_device() is 0
    device_id = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())) if device == "gpu" else 0
    return DaliDecoder(DaliDecodeConfig(device=device, device_id=device_id))
