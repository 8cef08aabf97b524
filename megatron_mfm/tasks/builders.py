"""The 15 MfM tasks: from one training clip, the condition the model sees and the prompt.

The condition follows the official pipeline: 5 pixel-space channels at the clip's full frame
count and resolution, ``[RGB * mask (3, in [-1, 1]), depth (1), mask (1)]`` with mask 1 on
known pixels. Depth is given only on the known frames of generation tasks (i2v, itrans, vexd,
vtrans); editing tasks see zero depth. The target is always the clip itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_mfm.tasks.degradations import grayscale, low_resolution
from megatron_mfm.tasks.masks import border_mask, inpainting_mask

# Official prompt names (the text after "#task: ").
TASK_NAMES = {
    "t2i": "text-to-image",
    "t2v": "text-to-video",
    "i2v": "image-to-video",
    "itrans": "image-to-image transition",
    "vexd": "video extending",
    "vtrans": "video-to-video transition",
    "isr": "image super-resolution",
    "vsr": "video super-resolution",
    "icolor": "image colorization",
    "vcolor": "video colorization",
    "iinp": "image inpainting",
    "ioutp": "image outpainting",
    "vinp": "video inpainting",
    "voutp": "video outpainting",
    "vedit": "video editing",
}
TASKS = tuple(TASK_NAMES)
IMAGE_TASKS = ("t2i", "isr", "icolor", "iinp", "ioutp")
VIDEO_TASKS = tuple(t for t in TASKS if t not in IMAGE_TASKS)
GENERATION_TASKS = ("i2v", "itrans", "vexd", "vtrans")  # the ones that get depth
CONTEXT_FRAMES = 8  # frames given to vexd (and to each side of vtrans) at 97 frames


@dataclass
class Clip:
    """One training sample as the data loader provides it."""

    pixels: torch.Tensor
    """(3, F, H, W) in [-1, 1]; images have F = 1."""
    caption: str
    fps: float = 16.0
    depth: torch.Tensor | None = None
    """(1, F, H, W) depth of every frame, or None (then no depth is given)."""
    edit_source: torch.Tensor | None = None
    """(3, F, H, W) the clip before an edit, for vedit pairs."""
    key: str = ""

    @property
    def is_image(self) -> bool:
        return self.pixels.shape[1] == 1


@dataclass
class TaskSample:
    """What one task makes of a clip: target pixels, 5-channel condition, prompt, motion score."""

    task: str
    pixels: torch.Tensor
    condition: torch.Tensor
    prompt: str
    motion_score: float
    key: str = ""
    depth_to_estimate: list[int] = field(default_factory=list)
    """Frames whose depth the condition should carry but the clip lacks (real media): the
    training step fills them with the depth model's estimate."""


@dataclass
class _Condition:
    rgb: torch.Tensor  # (3, F, H, W) before masking
    mask: torch.Tensor  # (1, F, H, W)
    depth_frames: list[int]


def _frames_known(clip: Clip, frames: list[int]) -> _Condition:
    mask = torch.zeros(1, *clip.pixels.shape[1:])
    mask[:, frames] = 1
    return _Condition(clip.pixels, mask, frames)


def _all_known(rgb: torch.Tensor) -> _Condition:
    return _Condition(rgb, torch.ones(1, *rgb.shape[1:]), [])


def _spatial(clip: Clip, mask_2d: torch.Tensor) -> _Condition:
    mask = mask_2d.expand(1, clip.pixels.shape[1], *mask_2d.shape).clone()
    return _Condition(clip.pixels, mask, [])


def _nothing_known(clip: Clip) -> _Condition:
    return _Condition(clip.pixels, torch.zeros(1, *clip.pixels.shape[1:]), [])


def extension_frames(num_frames: int) -> int:
    """Known leading frames for vexd: 8 at full length, at most half of a short clip."""
    return max(1, min(CONTEXT_FRAMES, num_frames // 2))


def transition_frames(num_frames: int) -> int:
    """Known frames on each side for vtrans: 8 at full length, at most a third of a short clip."""
    return max(1, min(CONTEXT_FRAMES, num_frames // 3))


def _vedit(clip: Clip, g: torch.Generator) -> _Condition:
    if clip.edit_source is None:
        raise ValueError(f"clip {clip.key!r}: vedit needs an edit_source (the clip before the edit)")
    return _all_known(clip.edit_source)


_BUILDERS: dict[str, Callable[[Clip, torch.Generator], _Condition]] = {
    "t2i": lambda c, g: _nothing_known(c),
    "t2v": lambda c, g: _nothing_known(c),
    "i2v": lambda c, g: _frames_known(c, [0]),
    "itrans": lambda c, g: _frames_known(c, [0, c.pixels.shape[1] - 1]),
    "vexd": lambda c, g: _frames_known(c, list(range(extension_frames(c.pixels.shape[1])))),
    "vtrans": lambda c, g: _frames_known(
        c,
        list(range(transition_frames(c.pixels.shape[1])))
        + list(range(c.pixels.shape[1] - transition_frames(c.pixels.shape[1]), c.pixels.shape[1])),
    ),
    "isr": lambda c, g: _all_known(low_resolution(c.pixels, g)),
    "vsr": lambda c, g: _all_known(low_resolution(c.pixels, g)),
    "icolor": lambda c, g: _all_known(grayscale(c.pixels)),
    "vcolor": lambda c, g: _all_known(grayscale(c.pixels)),
    "iinp": lambda c, g: _spatial(c, inpainting_mask(*c.pixels.shape[-2:], g)),
    "vinp": lambda c, g: _spatial(c, inpainting_mask(*c.pixels.shape[-2:], g)),
    "ioutp": lambda c, g: _spatial(c, border_mask(*c.pixels.shape[-2:], g)),
    "voutp": lambda c, g: _spatial(c, border_mask(*c.pixels.shape[-2:], g)),
    "vedit": _vedit,
}


def task_prompt(caption: str, task: str, fps: float) -> str:
    """Caption plus the official tags, lower-cased as the official text encoding does."""
    return f"{caption.strip()} #FPS: {round(fps)}. #task: {TASK_NAMES[task]}".lower()


def build_task_sample(
    clip: Clip,
    task: str,
    generator: torch.Generator,
    video_motion_score: float = 5.0,
) -> TaskSample:
    """Apply ``task`` to ``clip``; raises if the clip's kind (image/video) does not fit."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    if (task in IMAGE_TASKS) != clip.is_image:
        kind = "an image" if task in IMAGE_TASKS else "a video"
        raise ValueError(f"task {task} needs {kind}; clip {clip.key!r} has {clip.pixels.shape[1]} frames")
    cond = _BUILDERS[task](clip, generator)
    depth = torch.zeros(1, *clip.pixels.shape[1:])
    if cond.depth_frames and clip.depth is not None:
        depth[:, cond.depth_frames] = clip.depth[:, cond.depth_frames]
    condition = torch.cat([cond.rgb * cond.mask, depth, cond.mask], dim=0)
    return TaskSample(
        task=task,
        pixels=clip.pixels,
        condition=condition,
        prompt=task_prompt(clip.caption, task, clip.fps),
        motion_score=0.0 if clip.is_image else video_motion_score,
        key=clip.key,
        depth_to_estimate=cond.depth_frames if clip.depth is None else [],
    )
