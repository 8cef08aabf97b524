"""Which task each clip trains, and the dropouts that make classifier-free guidance work."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_mfm.tasks.builders import IMAGE_TASKS, TASKS, VIDEO_TASKS, Clip, TaskSample, build_task_sample


def _uniform() -> dict[str, float]:
    return {task: 1.0 for task in TASKS}


@dataclass
class TaskMixtureConfig:
    """Task ratios of one training stage (relative weights; images and videos are drawn from
    the tasks that fit them) and the guidance dropouts."""

    weights: dict[str, float] = field(default_factory=_uniform)
    """Relative weight of each task; tasks left out are never drawn."""

    text_dropout: float = 0.1
    """Probability of an empty prompt (the unconditional branch of guidance)."""

    depth_dropout: float = 0.1
    """Probability of zero depth (the official unconditional branch keeps pixels, drops depth)."""

    video_motion_score: float = 5.0
    """Motion score of video samples (images use 0, as the official pipeline)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(TASKS))
        if unknown:
            raise ValueError(f"tasks.weights: unknown tasks {unknown}; tasks are {list(TASKS)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("tasks.weights must be non-negative with a positive sum")
        for name in ("text_dropout", "depth_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"tasks.{name}={getattr(self, name)} must be within [0, 1]")


class TaskMixture:
    """Draws a task for a clip and builds its sample."""

    def __init__(self, config: TaskMixtureConfig):
        self.config = config

    def candidates(self, clip: Clip) -> list[str]:
        """Tasks with positive weight that fit the clip (vedit needs an edit pair)."""
        fits = IMAGE_TASKS if clip.is_image else VIDEO_TASKS
        return [
            t for t in fits
            if self.config.weights.get(t, 0.0) > 0 and (t != "vedit" or clip.edit_source is not None)
        ]

    def choose(self, clip: Clip, generator: torch.Generator) -> str:
        tasks = self.candidates(clip)
        if not tasks:
            kind = "image" if clip.is_image else "video"
            raise ValueError(f"clip {clip.key!r}: no task with positive weight accepts a {kind}")
        weights = torch.tensor([self.config.weights[t] for t in tasks], dtype=torch.float64)
        return tasks[int(torch.multinomial(weights, 1, generator=generator))]

    def sample(self, clip: Clip, generator: torch.Generator) -> TaskSample:
        """A task sample for ``clip`` with the guidance dropouts applied."""
        sample = build_task_sample(clip, self.choose(clip, generator), generator, self.config.video_motion_score)
        if torch.rand(1, generator=generator).item() < self.config.text_dropout:
            sample.prompt = ""
        if torch.rand(1, generator=generator).item() < self.config.depth_dropout:
            sample.condition[3] = 0
            sample.depth_to_estimate = []
        return sample
