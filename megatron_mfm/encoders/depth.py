"""Depth-Anything-V2 depth of the known frames, as the official MfM pipeline computes it.

The official pipeline (``mfm/pipelines/pipeline_mfm.py``) runs the transformers
``depth-estimation`` pipeline on each known frame (a uint8 PIL image) and puts its
``predicted_depth`` (relative inverse depth: larger is nearer; not normalised; bicubic-resized to
the frame size) into the condition. The image processor's steps are repeated here on the same
uint8 pixels: PIL bicubic resize to the processor's size keeping the aspect ratio and a multiple
of the patch size, scale by 1/255, ImageNet normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BICUBIC = 3  # PIL's resample code, as stored in preprocessor_config.json


def _multiple_of(value: float, multiple: int) -> int:
    """Round to a multiple of ``multiple``, never below one multiple."""
    return max(multiple, round(value / multiple) * multiple)


@dataclass
class DepthPreprocessing:
    """The image processor's resize and normalisation (DPT/Depth-Anything conventions)."""

    height: int = 518
    width: int = 518
    multiple: int = 14
    keep_aspect_ratio: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_processor_config(cls, config: dict, source: str) -> DepthPreprocessing:
        """From a ``preprocessor_config.json`` dict; ``source`` names the file in errors."""
        if config.get("resample", BICUBIC) != BICUBIC or not config.get("do_normalize", True):
            raise ValueError(f"{source}: only bicubic resizing with normalisation is supported")
        size = config.get("size", {})
        return cls(height=size.get("height", cls.height), width=size.get("width", cls.width),
                   multiple=config.get("ensure_multiple_of", 1), keep_aspect_ratio=config.get("keep_aspect_ratio", False),
                   mean=tuple(config.get("image_mean", cls.mean)), std=tuple(config.get("image_std", cls.std)))

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The model's input size for a frame: with keep_aspect_ratio, the one scale that changes
        the frame least (as the DPT image processor chooses it)."""
        scale_h, scale_w = self.height / height, self.width / width
        if self.keep_aspect_ratio:
            scale_h = scale_w = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
        return _multiple_of(scale_h * height, self.multiple), _multiple_of(scale_w * width, self.multiple)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> normalised model input (N, 3, h, w) on the frames' device."""
        height, width = self.input_size(*frames.shape[-2:])
        pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        resized = [Image.fromarray(frame.permute(1, 2, 0).cpu().numpy()).resize((width, height), Image.BICUBIC)
                   for frame in pixels]
        unit = torch.from_numpy(np.stack([np.asarray(image) for image in resized]).astype(np.float64) * (1 / 255))
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        normalised = (unit.float().permute(0, 3, 1, 2) - mean[:, None, None]) / std[:, None, None]
        return normalised.to(frames.device)


class DepthAnythingEstimator:
    """(N, 3, H, W) frames in [-1, 1] -> (N, H, W) raw relative depth (larger is nearer)."""

    def __init__(self, model: torch.nn.Module, preprocessing: DepthPreprocessing):
        self.model = model.eval().requires_grad_(False)
        self.preprocessing = preprocessing

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        weight = next(self.model.parameters())
        inputs = self.preprocessing(frames.to(weight.device)).to(weight.dtype)
        depth = self.model(pixel_values=inputs).predicted_depth  # (N, h, w)
        depth = F.interpolate(depth[:, None].float(), size=frames.shape[-2:], mode="bicubic", align_corners=False)
        return depth[:, 0].to(frames.device)

