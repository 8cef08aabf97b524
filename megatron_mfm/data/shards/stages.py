"""The resolution-progressive training schedule: stages of buckets, budgets and task mixtures.

MfM-style pretraining starts on small images and short clips and moves to larger ones; each
stage runs a number of iterations and the switch happens at an iteration boundary, so a run
resumed mid-stage continues in the same stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_mfm.tasks.builders import TASKS


def _default_resolutions() -> list[list[int]]:
    return [[64, 64]]


def _default_frames() -> list[int]:
    return [17]


@dataclass
class StageConfig:
    name: str = "stage"
    iterations: int = 0
    """Iterations of this stage; 0 on the last stage means until the end of training."""
    resolutions: list[list[int]] = field(default_factory=_default_resolutions)
    """[height, width] pairs (multiples of 16): each sample goes to the one nearest its aspect."""
    frames: list[int] = field(default_factory=_default_frames)
    """Video frame counts (4k+1): each clip gets the longest it has at ``data.shards.fps``."""
    token_budget: int = 0
    """DiT tokens per micro-batch (0: train.micro_batch_size samples per micro-batch)."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """This stage's task weights ({}: the run's ``tasks.weights``)."""

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}:"
        if self.iterations < 0:
            raise ValueError(f"{where} iterations={self.iterations} must be >= 0")
        if not self.resolutions or any(len(r) != 2 or r[0] % 16 or r[1] % 16 or min(r) <= 0 for r in self.resolutions):
            raise ValueError(f"{where} resolutions={self.resolutions}: need [height, width] pairs, multiples of 16")
        if not self.frames or any(f < 1 or (f - 1) % 4 for f in self.frames):
            raise ValueError(f"{where} frames={self.frames}: frame counts must be 4k+1")
        if self.token_budget < 0:
            raise ValueError(f"{where} token_budget={self.token_budget} must be >= 0")
        unknown = sorted(set(self.task_weights) - set(TASKS))
        if unknown:
            raise ValueError(f"{where} task_weights: unknown tasks {unknown}; tasks are {list(TASKS)}")

    @property
    def resolution_pairs(self) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for h, w in self.resolutions]


class StageSchedule:
    """Which stage an iteration (0-based) belongs to."""

    def __init__(self, stages: list[StageConfig]):
        if not stages:
            raise ValueError("data.stages: at least one stage is needed")
        if any(s.iterations == 0 for s in stages[:-1]):
            raise ValueError("data.stages: only the last stage may have iterations 0 (until the end)")
        self.stages = stages
        self.ends = []
        total = 0
        for stage in stages:
            total += stage.iterations
            self.ends.append(total)

    def index_at(self, iteration: int) -> int:
        for index, end in enumerate(self.ends[:-1]):
            if iteration < end:
                return index
        return len(self.stages) - 1
