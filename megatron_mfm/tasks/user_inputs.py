"""User media (image, video, mask files) -> the condition and prompt of one MfM task at sampling.

Frames are placed as the official pipeline places them: i2v puts the image at frame 0, itrans its
two images at the first and last frame, vexd the last context frames of the video at the start,
vtrans the last context frames of video A at the start and the first of video B at the end. The
remaining tasks see the whole input. Super-resolution takes the low-resolution input as given
(upscaled), and a user mask replaces the builders' random masks. The generation tasks' revealed
frames are marked for depth, which the depth model fills in at sampling (``--depth-path``; zero
without one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megatron_mfm.tasks.builders import (
    IMAGE_TASKS,
    TASKS,
    Clip,
    TaskSample,
    build_task_sample,
    extension_frames,
    task_prompt,
    transition_frames,
)
from megatron_mfm.utils.media import read_video

# How many image / video files each task takes (others take none).
IMAGE_INPUTS = {"i2v": 1, "itrans": 2, "isr": 1, "icolor": 1, "iinp": 1, "ioutp": 1}
VIDEO_INPUTS = {"vexd": 1, "vtrans": 2, "vsr": 1, "vcolor": 1, "vinp": 1, "voutp": 1, "vedit": 1}
MASK_TASKS = ("iinp", "ioutp", "vinp", "voutp")
VIDEO_MOTION_SCORE = 5.0


@dataclass
class TaskInputs:
    """What one sample is made from."""

    task: str
    prompt: str = ""
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    mask: str | None = None
    mask_white: str = "generate"
    """What white pixels of ``mask`` mean: ``generate`` (the usual inpainting convention) or
    ``keep`` (the official MfM benchmark masks)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: choose one of {', '.join(TASKS)}")
        for kind, counts, given in (("image", IMAGE_INPUTS, self.images), ("video", VIDEO_INPUTS, self.videos)):
            wanted = counts.get(self.task, 0)
            if given and len(given) != wanted:
                raise ValueError(f"task {self.task} takes {wanted} {kind} file(s), got {len(given)}: {given}")
        if self.mask and self.task not in MASK_TASKS:
            raise ValueError(f"task {self.task} takes no mask (masks are for {', '.join(MASK_TASKS)}): {self.mask}")
        if self.mask_white not in ("generate", "keep"):
            raise ValueError(f"mask_white={self.mask_white!r}: choose generate or keep")
        for path in [*self.images, *self.videos, *([self.mask] if self.mask else [])]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: input file of task {self.task} not found")

    @property
    def has_media(self) -> bool:
        return bool(self.images or self.videos)

    @classmethod
    def shared(cls, task: str, images: list[str], videos: list[str], mask: str | None, **fields) -> "TaskInputs":
        """Inputs of ``task`` from files given for several tasks: each keeps the kinds it takes."""
        return cls(task=task, images=images if task in IMAGE_INPUTS else [],
                   videos=videos if task in VIDEO_INPUTS else [], mask=mask if task in MASK_TASKS else None, **fields)


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, F, h, w) -> (C, F, height, width), bicubic, clamped to the input's range."""
    resized = F.interpolate(pixels.transpose(0, 1), size=(height, width), mode="bicubic", antialias=True)
    return resized.transpose(0, 1).clamp(pixels.min(), pixels.max())


def read_image(path: str, height: int, width: int) -> torch.Tensor:
    """An image file as (3, 1, height, width) in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return _resize(torch.from_numpy(array.copy()).permute(2, 0, 1)[:, None].float() / 127.5 - 1, height, width)


def read_clip(path: str, height: int, width: int, frames: int | None = None) -> torch.Tensor:
    """A video file as (3, F, height, width) in [-1, 1]: its first ``frames`` frames, or all."""
    video = read_video(path)
    if frames is not None:
        if len(video) < frames:
            raise ValueError(f"{path}: {len(video)} frames, the task needs {frames} (set --frames lower)")
        video = video[:frames]
    return _resize(torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1, height, width)


def read_mask(path: str, height: int, width: int, white: str) -> torch.Tensor:
    """A mask image as (height, width) with 1 on known pixels (nearest resize, threshold 0.5)."""
    from PIL import Image

    with Image.open(path) as image:
        grey = torch.from_numpy(np.asarray(image.convert("L")).copy()).float() / 255
    white_pixels = F.interpolate(grey[None, None], size=(height, width), mode="nearest")[0, 0] > 0.5
    return (white_pixels if white == "keep" else ~white_pixels).float()


def _placed_clip(inputs: TaskInputs, frames: int, height: int, width: int) -> torch.Tensor:
    """(3, F, H, W): the input frames where the task's known frames are, zeros elsewhere."""
    task = inputs.task
    if task in IMAGE_TASKS:
        return read_image(inputs.images[0], height, width) if inputs.images else torch.zeros(3, 1, height, width)
    pixels = torch.zeros(3, frames, height, width)
    if task == "i2v":
        pixels[:, :1] = read_image(inputs.images[0], height, width)
    elif task == "itrans":
        pixels[:, :1] = read_image(inputs.images[0], height, width)
        pixels[:, -1:] = read_image(inputs.images[1], height, width)
    elif task in ("vexd", "vtrans"):
        context = extension_frames(frames) if task == "vexd" else transition_frames(frames)
        first = read_clip(inputs.videos[0], height, width)
        if first.shape[1] < context:
            raise ValueError(f"{inputs.videos[0]}: {first.shape[1]} frames, {task} needs at least {context}")
        pixels[:, :context] = first[:, -context:]
        if task == "vtrans":
            pixels[:, -context:] = read_clip(inputs.videos[1], height, width, context)
    elif inputs.videos:
        pixels = read_clip(inputs.videos[0], height, width, frames)
    return pixels


def _given_condition(task: str, rgb: torch.Tensor, known: torch.Tensor, prompt: str, fps: float) -> TaskSample:
    """A task sample whose condition is exactly ``rgb`` on the ``known`` pixels (1, F, H, W)."""
    condition = torch.cat([rgb * known, torch.zeros_like(known), known])
    motion = 0.0 if task in IMAGE_TASKS else VIDEO_MOTION_SCORE
    return TaskSample(task=task, pixels=rgb, condition=condition, prompt=task_prompt(prompt, task, fps),
                      motion_score=motion)


def task_sample_from_inputs(inputs: TaskInputs, frames: int, height: int, width: int, fps: float) -> TaskSample:
    """The condition and prompt of ``inputs.task`` made from the user's files."""
    if inputs.task not in ("t2i", "t2v") and not inputs.has_media:
        raise ValueError(f"task {inputs.task} needs an input file: pass --image or --video (or set them per line)")
    pixels = _placed_clip(inputs, frames, height, width)
    known = torch.ones(1, *pixels.shape[1:])
    if inputs.task in ("isr", "vsr"):  # the input is the low-resolution clip itself
        return _given_condition(inputs.task, pixels, known, inputs.prompt, fps)
    if inputs.mask:
        known = read_mask(inputs.mask, height, width, inputs.mask_white).expand_as(known)
        return _given_condition(inputs.task, pixels, known.contiguous(), inputs.prompt, fps)
    edit_source = pixels if inputs.task == "vedit" else None
    clip = Clip(pixels=pixels, caption=inputs.prompt, fps=fps, edit_source=edit_source, key=inputs.task)
    return build_task_sample(clip, inputs.task, torch.Generator().manual_seed(inputs.seed), VIDEO_MOTION_SCORE)


def read_prompt_file(path: str | Path, tasks: list[str], mask_white: str = "generate", seed: int = 0) -> list[TaskInputs]:
    """Requests from a prompt file: one prompt per line, or JSON lines with ``prompt`` and
    optionally ``task``, ``image``, ``video`` (a path or a list), ``mask`` and ``seed``. A line
    without a task is sampled for each of ``tasks``. Paths are relative to the prompt file's
    folder; blank lines are skipped."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path}: not found")
    local = lambda value: [str(path.parent / v) for v in ([value] if isinstance(value, str) else value)]  # noqa: E731
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            fields = json.loads(line) if line.startswith("{") else {"prompt": line}
            unknown = sorted(set(fields) - {"prompt", "task", "image", "video", "mask", "seed"})
            if unknown:
                raise ValueError(f"unknown fields {unknown}")
            for task in [fields["task"]] if "task" in fields else tasks:
                requests.append(TaskInputs(
                    task=task, prompt=fields.get("prompt", ""), images=local(fields.get("image", [])),
                    videos=local(fields.get("video", [])), mask=local(fields["mask"])[0] if "mask" in fields else None,
                    mask_white=mask_white, seed=int(fields.get("seed", seed)),
                ))
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    if not requests:
        raise ValueError(f"--prompt-file {path}: no prompts in it")
    return requests
