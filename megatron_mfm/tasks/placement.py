"""Where user media lands in the sampled canvas, as the official MfM pipeline places it.

``mfm/pipelines/pipeline_mfm.py`` keeps the input's aspect ratio: a portrait input swaps the
requested height and width, the frames are resized (PIL bicubic) to the largest size of that ratio
that fits, floored to multiples of 16, and pasted in the middle of a black canvas (``keep_ratio``;
``keep_res`` generates at the resized size instead). Masks follow the frames and are black (to be
generated) on the bars. Pixels map to [-1, 1] as (x / 255 - 0.5) / 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CROP_TYPES = ("keep_ratio", "keep_res")


@dataclass
class Canvas:
    """The generated size and where the (resized) input sits in it."""

    height: int
    width: int
    inner: tuple[int, int]
    """(width, height) of the resized input (multiples of 16)."""
    offset: tuple[int, int]
    """(left, top) of the input in the canvas."""


def oriented(input_size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """(height, width) of the request, swapped for a portrait input (PIL size: width, height)."""
    return (width, height) if input_size[0] < input_size[1] else (height, width)


def canvas_for(input_size: tuple[int, int], height: int, width: int, crop_type: str = "keep_ratio") -> Canvas:
    """The canvas of an input of PIL ``input_size`` (width, height) for a requested height x width."""
    if crop_type not in CROP_TYPES:
        raise ValueError(f"crop type {crop_type!r}: choose {' or '.join(CROP_TYPES)}")
    image_width, image_height = input_size
    height, width = oriented(input_size, height, width)
    scale = min(width / image_width, height / image_height)
    inner = (round(image_width * scale) // 16 * 16, round(image_height * scale) // 16 * 16)
    if min(inner) == 0:
        raise ValueError(f"an input of {image_width}x{image_height} leaves no 16-pixel block in {width}x{height}")
    if crop_type == "keep_res":
        return Canvas(inner[1], inner[0], inner, (0, 0))
    return Canvas(height, width, inner, ((width - inner[0]) // 2, (height - inner[1]) // 2))


def place(image: Image.Image, canvas: Canvas) -> Image.Image:
    """``image`` resized (bicubic) to the canvas's inner size, on a black canvas."""
    resized = image.resize(canvas.inner, Image.BICUBIC)
    if (canvas.width, canvas.height) == canvas.inner:
        return resized
    placed = Image.new(image.mode, (canvas.width, canvas.height))
    placed.paste(resized, canvas.offset)
    return placed


def to_signed(images: list[Image.Image], mode: str = "RGB") -> torch.Tensor:
    """Images -> (C, F, H, W) in [-1, 1] (C = 3 for RGB, 1 for L)."""
    arrays = [np.asarray(image.convert(mode)).reshape(image.height, image.width, -1) for image in images]
    frames = [torch.from_numpy(array.copy()).permute(2, 0, 1) for array in arrays]
    return (torch.stack(frames, dim=1).float().div(255) - 0.5) / 0.5


def to_unit(masks: list[Image.Image]) -> torch.Tensor:
    """Grey masks -> (1, F, H, W) in [0, 1] (1 on known pixels), with the pipeline's arithmetic."""
    return to_signed(masks, "L") * 0.5 + 0.5


def greyscale(pixels: torch.Tensor) -> torch.Tensor:
    """(3, ...) in [-1, 1] -> its luma (ITU-R 601-2, as torchvision) in all three channels."""
    unit = pixels * 0.5 + 0.5
    luma = 0.2989 * unit[0] + 0.587 * unit[1] + 0.114 * unit[2]
    return luma.expand_as(unit) * 2.0 - 1.0


def stretch(images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """Frames resized (bicubic, not keeping the ratio) to height x width, as (3, F, H, W) in [-1, 1]:
    the input frames the official output shows around the generated clip."""
    return to_signed([image.resize((width, height), Image.BICUBIC) for image in images])
