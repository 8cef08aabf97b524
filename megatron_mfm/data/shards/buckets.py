"""Resolution x aspect x frame-count buckets and token budgets.

A micro-batch holds samples of one bucket (one tensor shape); its size is how many of them fit
the stage's token budget, so image micro-batches carry many images and video micro-batches few
clips at about the same cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_mfm.data.shards.catalog import SampleEntry
from megatron_mfm.model.geometry import clip_tokens


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def tokens(self) -> int:
        """DiT tokens of one sample (the VAE compresses time 4x after the first frame)."""
        return clip_tokens(self.frames, self.height, self.width)

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, name: str) -> "Bucket":
        frames, height, width = (int(v) for v in name.split("x"))
        return cls(height, width, frames)


def nearest_resolution(entry: SampleEntry, resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """The resolution whose aspect ratio is closest to the sample's (in log space: 2:1 is as far
    from 1:1 as 1:2); ties go to the larger area, since crops lose less than upscales."""
    aspect = math.log(entry.height / entry.width)
    return min(resolutions, key=lambda r: (abs(math.log(r[0] / r[1]) - aspect), -r[0] * r[1]))


def assign_bucket(entry: SampleEntry, resolutions: list[tuple[int, int]], frame_counts: list[int],
                  fps: float) -> Bucket | None:
    """The sample's bucket: nearest aspect, and for videos the longest frame count the clip has
    at ``fps``; None when the clip is shorter than every frame count."""
    height, width = nearest_resolution(entry, resolutions)
    if entry.is_image:
        return Bucket(height, width, 1)
    available = entry.duration_frames(fps)
    fitting = [f for f in frame_counts if f <= available]
    return Bucket(height, width, max(fitting)) if fitting else None


def samples_per_micro_batch(bucket: Bucket, token_budget: int, micro_batch_size: int) -> int:
    """``micro_batch_size`` without a budget; else as many samples as fit (at least one)."""
    if token_budget <= 0:
        return micro_batch_size
    return max(1, token_budget // bucket.tokens)
