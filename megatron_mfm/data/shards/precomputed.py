"""Precomputed VAE latents and T5 states (``data_prep/encode_shards.py`` sidecars) for the loader.

A sidecar shard carries the name of the shard it encodes and holds ``KEY.latents.npy`` and
``KEY.text.npz`` per sample; ``encode-settings.json`` says how the clips were decoded. Both sides
decode from the first frame (``decode.frame_indices``) and crop the centre
(``decode.cover_crop_box``), so a sample's latents stand in for the VAE exactly when the loader
decodes the same frame count, size and source frames. Its text states stand in for T5 when the
sample's tagged prompt is one the sidecar encoded (text dropout's empty prompt never is). Every
other part is encoded by the training step and counted; a missing or corrupt sidecar is never fatal.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch

from megatron_mfm.data.shards.buckets import Bucket
from megatron_mfm.data.shards.catalog import SampleEntry
from megatron_mfm.data.decode.pyav import frame_indices
from megatron_mfm.data.shards.stages import StageConfig
from megatron_mfm.model.geometry import latent_shape

SETTINGS = "encode-settings.json"
T = TypeVar("T")


@dataclass
class Precomputed:
    """What the sidecars give one sample; None parts are encoded by the training step."""

    latents: torch.Tensor | None = None
    """(C, T, H/8, W/8) scaled VAE latents, in the stored dtype."""
    text: torch.Tensor | None = None
    """(L, D) T5 states of the sample's prompt, in the stored dtype."""
    text_mask: torch.Tensor | None = None
    """(L,) bool, True on real tokens."""


@dataclass(frozen=True)
class SidecarSettings:
    """How a sidecar folder's clips were decoded (its ``encode-settings.json``)."""

    folder: str
    frames: int
    height: int
    width: int
    fps: float | None
    """None: videos at their stored rate."""

    @classmethod
    def load(cls, folder: str) -> SidecarSettings:
        path = Path(folder) / SETTINGS
        try:
            settings = json.loads(path.read_text())
            fps = None if settings["fps"] is None else float(settings["fps"])
            return cls(folder, int(settings["frames"]), int(settings["height"]), int(settings["width"]), fps)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"data.shards.precomputed={folder!r}: no readable {SETTINGS} ({error}); "
                             "write the sidecars with data_prep/encode_shards.py") from error

    def check(self, stages: list[StageConfig], fps: float, has_videos: bool) -> None:
        """Refuse a folder whose settings no sample of the run could use, naming the field."""
        where = f"data.shards.precomputed={self.folder!r}: {SETTINGS} has"
        resolutions = sorted({pair for stage in stages for pair in stage.resolution_pairs})
        if (self.height, self.width) not in resolutions:
            raise ValueError(f"{where} height={self.height}, width={self.width}; data.stages train at {resolutions}")
        if not has_videos:
            return
        frames = sorted({f for stage in stages for f in stage.frames})
        if self.frames not in frames:
            raise ValueError(f"{where} frames={self.frames}; data.stages use frames {frames}")
        if self.fps is not None and self.fps != fps:
            raise ValueError(f"{where} fps={self.fps:g}; data.shards.fps={fps:g}")

    def same_clip(self, entry: SampleEntry, bucket: Bucket, fps: float) -> bool:
        """Whether the loader decodes the very clip the sidecar encoded: same size and, for
        videos, the same frame count and source frames (``fps`` is the loader's rate)."""
        if (bucket.height, bucket.width) != (self.height, self.width):
            return False
        if entry.is_image:
            return True
        return (bucket.frames == self.frames
                and frame_indices(entry.fps, self.frames, fps) == frame_indices(entry.fps, self.frames, self.fps))


@lru_cache(maxsize=32)
def _members(path: str, version: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """(offset, size) of every member of a sidecar shard, read once per worker and ``version``
    (mtime, size): the sidecars carry no catalog, and the planner reads shards in runs."""
    with tarfile.open(path) as tar:
        return {member.name: (member.offset_data, member.size) for member in tar}


def _read_member(folder: str, shard: str, name: str) -> bytes:
    """One member's bytes; FileNotFoundError or KeyError when the shard or member is absent."""
    path = os.path.join(folder, shard)
    stat = os.stat(path)
    offset, size = _members(path, (stat.st_mtime_ns, stat.st_size))[name]
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"{name} truncated")
    return data


def _latents(data: bytes, bucket: Bucket) -> torch.Tensor:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    grid = latent_shape(bucket.frames, bucket.height, bucket.width)[1:]
    if array.ndim != 4 or array.shape[1:] != grid or array.dtype.kind != "f":
        raise ValueError(f"latents of shape {array.shape} ({array.dtype}), expected (C, {', '.join(map(str, grid))})")
    return torch.from_numpy(array)


def _text(data: bytes) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(prompts, states (N, L, D), mask (N, L)) of a sample's text sidecar."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        prompts, states, mask = arrays["prompts"].tolist(), arrays["states"], arrays["mask"]
    if states.ndim != 3 or mask.shape != states.shape[:2] or len(prompts) != len(states):
        raise ValueError(f"text states {states.shape}, mask {mask.shape} and {len(prompts)} prompts do not match")
    return prompts, states, mask


def _part(part: str, read: Callable[[], T], misses: list[tuple[str, str]], where: str) -> T | None:
    """``read()``, or None with the reason appended to ``misses``."""
    try:
        return read()
    except (FileNotFoundError, KeyError) as error:
        misses.append((f"{part}: missing", f"{where}: {type(error).__name__}: {error}"))
    except (OSError, ValueError, EOFError, tarfile.TarError, zipfile.BadZipFile) as error:
        misses.append((f"{part}: corrupt", f"{where}: {type(error).__name__}: {error}"))
    return None


def lookup(settings: SidecarSettings, entry: SampleEntry, bucket: Bucket, fps: float,
           prompt: str) -> tuple[Precomputed, list[tuple[str, str]]]:
    """The sample's sidecar parts that fit, and (reason, detail) for each part the step must
    encode: ``latents: other clip``, ``text: other prompt``, ``<part>: missing`` or ``<part>: corrupt``."""
    found, misses = Precomputed(), []
    where = f"{settings.folder}/{entry.shard}/{entry.key}"
    if settings.same_clip(entry, bucket, fps):
        found.latents = _part("latents", lambda: _latents(
            _read_member(settings.folder, entry.shard, f"{entry.key}.latents.npy"), bucket), misses, where)
    else:
        misses.append(("latents: other clip", ""))
    text = _part("text", lambda: _text(_read_member(settings.folder, entry.shard, f"{entry.key}.text.npz")),
                 misses, where)
    if text is not None:
        prompts, states, mask = text
        if prompt in prompts:  # copies: a row alone travels to the training process
            row = prompts.index(prompt)
            found.text, found.text_mask = torch.from_numpy(states[row].copy()), torch.from_numpy(mask[row].astype(bool))
        else:
            misses.append(("text: other prompt", ""))
    return found, misses
