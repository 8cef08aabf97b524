"""Writing samples: mp4 (PyAV, H.264) and PNG contact sheets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(path: str | Path, pixels: torch.Tensor, fps: float = 16.0, codec: str = "libx264", crf: int = 18) -> Path:
    """Encode a clip (3, F, H, W) in [-1, 1] as mp4 (yuv420p, even sizes, quality ``crf``); H.264
    unless ``codec`` names another encoder (``libvpx-vp9`` for decoders that refuse H.264)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8_frames(pixels)
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            packet = stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]), format="rgb24"))
            container.mux(packet)
        container.mux(stream.encode())
    return path


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as (F, H, W, 3) uint8."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def contact_sheet(clips: list[torch.Tensor], columns: int = 6) -> np.ndarray:
    """One row per clip (3, F, H, W), ``columns`` evenly spaced frames: (rows*H, columns*W, 3)."""
    rows = []
    for clip in clips:
        frames = to_uint8_frames(clip)
        picks = np.linspace(0, len(frames) - 1, columns).round().astype(int)
        rows.append(np.concatenate([frames[i] for i in picks], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
