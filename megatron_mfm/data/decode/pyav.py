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
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(stream))
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            width, height, codec = stream.codec_context.width, stream.codec_context.height, stream.codec_context.name
    except Exception as error:
        raise MediaError(f"{name}: not a decodable video ({type(error).__name__}: {error})") from error
    if frames == 0:
        raise MediaError(f"{name}: no decodable frames")
    return MediaInfo("video", width, height, frames, fps, codec)


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
            with av.open(io.BytesIO(data)) as container:
                stream = container.streams.video[0]
                source_fps = float(stream.average_rate or fps or 1)
                wanted = set(frame_indices(source_fps, frames, fps))
                decoded = []
                for index, frame in enumerate(container.decode(stream)):
                    if index in wanted:
                        decoded.append(frame.to_ndarray(format="rgb24"))
                    if len(decoded) == frames:
                        break
        except Exception as error:
            raise MediaError(f"{name}: decoding failed ({error})") from error
        if len(decoded) < frames:
            raise MediaError(f"{name}: {len(decoded)} frames at {fps or source_fps:g} fps, {frames} needed")
        array = np.stack(decoded)
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1  # (F, 3, h, w)
    return _resize_crop(pixels, height, width).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
