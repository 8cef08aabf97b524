"""Probing and decoding media files with PyAV (the CPU backend): one output contract for all
backends, a ``Clip`` of 4k+1 frames at the bucket's size and a target fps."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi"}


class MediaError(ValueError):
    """A file that cannot be probed or decoded (corrupt, truncated, not media)."""


@dataclass
class MediaInfo:
    """What probing a file tells."""

    kind: str  # "video" or "image"
    width: int
    height: int
    frames: int
    fps: float
    codec: str

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.kind == "video" and self.fps else 0.0


def probe(data: bytes, name: str) -> MediaInfo:
    """Probe by decoding: frame count and size are what a decoder actually delivers, so a
    truncated file shows up here rather than in training."""
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return MediaInfo("image", image.width, image.height, 1, 0.0, image.format.lower())
        except Exception as error:
            raise MediaError(f"{name}: not a readable image ({error})") from error
    if suffix not in VIDEO_SUFFIXES:
        raise MediaError(f"{name}: unknown media type {suffix!r}")
    import av

    try:
        timing = video_timing(data)
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(stream))
            width, height, codec = stream.codec_context.width, stream.codec_context.height, stream.codec_context.name
    except Exception as error:
        raise MediaError(f"{name}: not a decodable video ({type(error).__name__}: {error})") from error
    if frames == 0:
        raise MediaError(f"{name}: no decodable frames")
    return MediaInfo("video", width, height, frames, timing.fps, codec)


@dataclass(frozen=True)
class VideoTiming:
    """When a video's frames are shown, from its packets' timestamps (demuxed, not decoded)."""

    times: np.ndarray
    """presentation times of the frames in display order (seconds)"""
    fps: float
    """the rate the frames are shown at; the mean rate of a variable-rate clip"""
    constant: bool
    """evenly spaced frames: sampled by index at ``fps``; otherwise by timestamp"""

    def source_frames(self, frames: int, fps: float | None, name: str) -> list[int]:
        """Display-order numbers of the source frames of ``frames`` output frames at ``fps``
        (never faster than the source; all backends take these). Raises ``MediaError`` when the
        clip is too short."""
        rate = min(fps or self.fps, self.fps)
        if self.constant or len(self.times) < 2:
            wanted = frame_indices(self.fps, frames, fps)
            if wanted[-1] >= len(self.times):
                raise MediaError(f"{name}: {len(self.times)} frames at {self.fps:g} fps, frame {wanted[-1]} needed "
                                 f"for {frames} frames at {rate:g} fps")
            return wanted
        targets = self.times[0] + np.arange(frames) / rate  # the frame shown nearest each output time
        if targets[-1] > self.times[-1] + 1e-6:
            raise MediaError(f"{name}: {len(self.times)} frames in {self.times[-1] - self.times[0]:.3f} s, "
                             f"{frames} frames at {rate:g} fps need {targets[-1] - targets[0]:.3f} s")
        after = np.searchsorted(self.times, targets).clip(1, len(self.times) - 1)
        nearer_before = targets - self.times[after - 1] <= self.times[after] - targets
        return np.where(nearer_before, after - 1, after).tolist()


def video_timing(data: bytes) -> VideoTiming:
    """The frame times and rate of a video. The rate is the container's when the timestamps agree
    with it: AVI (and some others) declare a rate of frame *slots* (e.g. 240 for a 24 fps clip)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stamps = [packet.pts if packet.pts is not None else packet.dts
                  for packet in container.demux(stream) if packet.size]
        declared = [float(rate) for rate in (stream.average_rate, stream.guessed_rate) if rate]
        tick = float(stream.time_base or 0)
    times = np.sort(np.array([stamp for stamp in stamps if stamp is not None], np.float64)) * tick
    if len(times) != len(stamps) or not tick:  # no usable timestamps: the declared rate
        rate = declared[0] if declared else 1.0
        return VideoTiming(np.arange(len(stamps)) / rate, rate, True)
    gaps = np.diff(times)
    if len(gaps) == 0 or gaps.sum() <= 0:
        return VideoTiming(times, declared[0] if declared else 1.0, True)
    measured = len(gaps) / gaps.sum()
    fps = next((rate for rate in declared if abs(rate / measured - 1) < 0.01), measured)
    typical = float(np.median(gaps))
    constant = bool(np.all(np.abs(gaps - typical) <= 0.1 * typical + tick))
    return VideoTiming(times, fps, constant)


def frame_indices(source_fps: float, frames: int, fps: float | None) -> list[int]:
    """Source frame numbers of the ``frames`` output frames at ``fps`` (never faster than the
    source), shared by all backends so they pick the same frames."""
    step = max(source_fps / fps, 1.0) if fps else 1.0
    return [round(i * step) for i in range(frames)]


def cover_crop_box(h: int, w: int, height: int, width: int) -> tuple[tuple[int, int], int, int]:
    """((resized h, resized w), top, left): scale an h x w frame to cover height x width, then
    centre crop; shared by all backends so they crop the same window."""
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    return size, (size[0] - height) // 2, (size[1] - width) // 2


def _resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(F, 3, h, w) float -> (F, 3, height, width): scale to cover, centre crop."""
    size, top, left = cover_crop_box(*frames.shape[-2:], height, width)
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
    return frames[..., top:top + height, left:left + width]


def decode_clip(data: bytes, name: str, frames: int, height: int, width: int, fps: float | None = None) -> torch.Tensor:
    """(3, F, height, width) in [-1, 1]. Videos: ``frames`` (4k+1) frames from the start,
    resampled to ``fps`` when given; images: one frame."""
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))[None]
    else:
        import av

        try:
            timing = video_timing(data)
        except Exception as error:
            raise MediaError(f"{name}: decoding failed ({error})") from error
        wanted = timing.source_frames(frames, fps, name)
        try:
            with av.open(io.BytesIO(data)) as container:
                decoded, needed = {}, set(wanted)
                for index, frame in enumerate(container.decode(container.streams.video[0])):
                    if index in needed:
                        decoded[index] = frame.to_ndarray(format="rgb24")
                    if index >= wanted[-1]:
                        break
        except Exception as error:
            raise MediaError(f"{name}: decoding failed ({error})") from error
        if wanted[-1] not in decoded:
            raise MediaError(f"{name}: {len(decoded)} of the {len(timing.times)} frames decode, frame {wanted[-1]} "
                             f"needed for {frames} frames at {fps or timing.fps:g} fps")
        array = np.stack([decoded[index] for index in wanted])
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1  # (F, 3, h, w)
    return _resize_crop(pixels, height, width).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
