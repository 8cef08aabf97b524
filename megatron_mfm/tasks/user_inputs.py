"""User media (image, video, mask files) -> the condition and prompt of one MfM task at sampling,
as the official MfM pipeline (``mfm/pipelines/pipeline_mfm.py``) builds them.

Frames: i2v puts the image at frame 0, itrans its two images at the first and last frame; vexd
puts the last 8 frames of the video first, vtrans also the first 8 of video B last (and the output
shows the rest of the inputs around the generated clip); the generation tasks make ``frames``
frames. Editing tasks see their video's first min(frames, 4k+1) frames and generate that many.
Every input keeps its aspect ratio (``placement``). Masks: white is known (the official
convention; ``mask_white="generate"`` reads the other one); a video task's mask may be a video.
Colourisation sees the greyscale input, and isr/icolor outputs are resized back as the official
pipeline does. The generation tasks' revealed frames are marked for depth, which the depth model
fills in at sampling (zero without one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from megatron_mfm.tasks.builders import IMAGE_TASKS, TASKS, TaskSample
from megatron_mfm.tasks.placement import canvas_for, greyscale, oriented, place, stretch, to_signed, to_unit
from megatron_mfm.utils.media import read_video

# How many image / video files each task takes (others take none).
IMAGE_INPUTS = {"i2v": 1, "itrans": 2, "isr": 1, "icolor": 1, "iinp": 1, "ioutp": 1}
VIDEO_INPUTS = {"vexd": 1, "vtrans": 2, "vsr": 1, "vcolor": 1, "vinp": 1, "voutp": 1, "vedit": 1}
MASK_TASKS = ("iinp", "ioutp", "vinp", "voutp")
CONTEXT_FRAMES = 8
"""Frames vexd and vtrans take from each input video (the official script's ``trans_nums``)."""
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass
class TaskInputs:
    """What one sample is made from."""

    task: str
    prompt: str = ""
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    mask: str | None = None
    mask_white: str = "keep"
    """What white pixels of ``mask`` mean: ``keep`` (known, the official convention) or
    ``generate`` (the region to generate)."""
    seed: int | None = None
    """Noise seed of this sample; None: the run's noise stream continues (as the official script's
    one generator does over its prompts)."""

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
            raise ValueError(f"mask_white={self.mask_white!r}: choose keep or generate")
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


@dataclass
class Geometry:
    """The requested size (the official script's num_frames, height, width, crop_type, upscale)."""

    frames: int = 97
    height: int = 352
    width: int = 640
    crop_type: str = "keep_ratio"
    upscale: int = 4
    motion_score: float = 5.0
    """Motion score of video tasks (image tasks get 0)."""


@dataclass
class PreparedSample:
    """A task sample plus what the official output adds around the generated clip."""

    sample: TaskSample
    before: torch.Tensor | None = None
    """(3, n, H, W) input frames shown before the clip (vexd, vtrans)."""
    after: torch.Tensor | None = None
    """(3, n, H, W) input frames shown after it (vtrans)."""
    output_size: tuple[int, int] | None = None
    """(H, W) the decoded canvas is resized to (nearest): isr (input x upscale), icolor (input)."""

    def assemble(self, clip: torch.Tensor) -> torch.Tensor:
        """The official output of a decoded clip (3, F, H, W); like the official script, a total of
        4k frames loses its first 3."""
        if self.output_size is not None:
            clip = F.interpolate(clip.transpose(0, 1), size=self.output_size).transpose(0, 1)
        parts = [part.to(clip) for part in (self.before, clip, self.after) if part is not None and part.shape[1]]
        clip = torch.cat(parts, dim=1)
        return clip[:, 3:] if clip.shape[1] % 4 == 0 else clip


def text_only_sample(task: str, prompt: str, geometry: Geometry) -> PreparedSample:
    """t2i / t2v: an all-zero condition at the requested size."""
    frames = 1 if task in IMAGE_TASKS else geometry.frames
    zeros = torch.zeros(3, frames, geometry.height, geometry.width)
    return PreparedSample(TaskSample(task=task, pixels=zeros, condition=torch.zeros(5, *zeros.shape[1:]), prompt=prompt,
                                     motion_score=0.0 if task in IMAGE_TASKS else geometry.motion_score))


def _image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _video(path: str, least: int = 1) -> list[Image.Image]:
    frames = [Image.fromarray(frame) for frame in read_video(path)]
    if len(frames) < least:
        raise ValueError(f"{path}: {len(frames)} frames, the task needs at least {least}")
    return frames


def _masks(inputs: TaskInputs, count: int, size: tuple[int, int]) -> list[Image.Image]:
    """``count`` grey masks (white = known): the mask file's (a video's first frames, or one image
    for every frame), or all white."""
    if not inputs.mask:
        return [Image.new("L", size, 255)] * count
    if inputs.mask.lower().endswith(VIDEO_SUFFIXES):
        masks = [frame.convert("L") for frame in _video(inputs.mask, count)[:count]]
    else:
        with Image.open(inputs.mask) as image:
            masks = [image.convert("L")] * count
    return [ImageOps.invert(mask) for mask in masks] if inputs.mask_white == "generate" else masks


def _context(task: str, inputs: TaskInputs, frames: int):
    """Frames, masks, known frame indices and the unused input frames (before, after) of the
    generation tasks i2v, itrans, vexd, vtrans."""
    if task in ("i2v", "itrans"):
        first, rest, after = [_image(inputs.images[0])], [], []
    else:
        video = _video(inputs.videos[0], CONTEXT_FRAMES)
        first, rest, after = video[-CONTEXT_FRAMES:], video[:-CONTEXT_FRAMES], []
    size, known = first[0].size, len(first)
    pixels = first + [Image.new("RGB", size)] * (frames - known)
    masks = [Image.new("L", size, 255)] * known + [Image.new("L", size, 0)] * (frames - known)
    indices = list(range(known))
    if task in ("itrans", "vtrans"):
        last = [_image(inputs.images[1])] if task == "itrans" else _video(inputs.videos[1], CONTEXT_FRAMES)
        count = 1 if task == "itrans" else CONTEXT_FRAMES
        pixels[-count:], after = last[:count], last[count:]
        masks[-count:] = [Image.new("L", size, 255)] * count
        indices += list(range(frames - count, frames))
    return pixels, masks, indices, rest, after


def prepare_inputs(inputs: TaskInputs, prompt: str, geometry: Geometry) -> PreparedSample:
    """The condition of ``inputs.task`` from the user's files, with ``prompt`` as its full text."""
    task = inputs.task
    if not inputs.has_media:
        raise ValueError(f"task {task} needs an input file: pass --image or --video (or set them per line)")
    if task in ("vexd", "vtrans") and geometry.frames <= CONTEXT_FRAMES:
        raise ValueError(f"{task} makes more than the {CONTEXT_FRAMES} frames it takes from a video: raise --frames "
                         f"above {geometry.frames}")
    before, after, indices = [], [], []
    if task in ("i2v", "itrans", "vexd", "vtrans"):
        frames, masks, indices, before, after = _context(task, inputs, geometry.frames)
    elif task in IMAGE_INPUTS:
        frames = [_image(inputs.images[0])]
        masks = _masks(inputs, 1, frames[0].size)
    else:
        video = _video(inputs.videos[0])
        frames = video[:min(geometry.frames, (len(video) - 1) // 4 * 4 + 1)]
        masks = _masks(inputs, len(frames), frames[0].size)
    size = frames[0].size
    canvas = canvas_for(size, geometry.height, geometry.width, geometry.crop_type)
    output_size = None
    if task == "isr":
        output_size = (size[1] * geometry.upscale, size[0] * geometry.upscale)
    elif task == "icolor":
        output_size = size[::-1]
        frames = [frame.resize(oriented(size, geometry.height, geometry.width)[::-1], Image.BICUBIC) for frame in frames]
    pixels = to_signed([place(frame, canvas) for frame in frames])
    known = to_unit([place(mask, canvas) for mask in masks])
    rgb = greyscale(pixels) if task in ("icolor", "vcolor") else pixels
    condition = torch.cat([rgb * known, torch.zeros_like(known), known])
    sample = TaskSample(task=task, pixels=pixels, condition=condition, prompt=prompt,
                        motion_score=0.0 if task in IMAGE_TASKS else geometry.motion_score, depth_to_estimate=indices)
    return PreparedSample(sample, stretch(before, canvas.height, canvas.width) if before else None,
                          stretch(after, canvas.height, canvas.width) if after else None, output_size)


def read_prompt_file(path: str | Path, tasks: list[str], mask_white: str = "keep", seed: int | None = None
                     ) -> list[TaskInputs]:
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
                    mask_white=mask_white, seed=int(fields["seed"]) if "seed" in fields else seed,
                ))
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    if not requests:
        raise ValueError(f"--prompt-file {path}: no prompts in it")
    return requests
