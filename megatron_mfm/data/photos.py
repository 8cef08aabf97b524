"""Photographs as synthetic backgrounds: scikit-image's sample photos, panned and zoomed.

The procedural backgrounds have no real texture; these give the synthetic clips natural images
without a download (the photos ship inside the scikit-image wheel: ``pip install -e
".[photos]"``). A clip's camera moves linearly from one square window of a photo to another
(pan and zoom), every frame resampled bilinearly to the clip's size.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PHOTOS = {
    "astronaut.png": "an astronaut", "chelsea.png": "a cat", "coffee.png": "a cup of coffee",
    "rocket.jpg": "a rocket", "motorcycle_left.png": "a motorcycle", "hubble_deep_field.jpg": "galaxies",
    "retina.jpg": "a retina", "ihc.png": "stained tissue",
}
"""scikit-image's colour sample photographs and what the captions call them."""


def photo_folder() -> Path | None:
    """scikit-image's data folder, found without importing scikit-image (and its SciPy)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data"
    return folder if all((folder / name).is_file() for name in PHOTOS) else None


def require_photos() -> None:
    """Fail in one line, before any training, when the photos are not installed."""
    if photo_folder() is None:
        raise ValueError("data.synthetic.backgrounds: photo needs scikit-image's sample photographs: "
                         "pip install -e '.[photos]'")


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> torch.Tensor:
    """(3, H, W) uint8, read once per process."""
    with Image.open(photo_folder() / name) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


@functools.lru_cache(maxsize=None)
def averaged_photo(name: str, block: int) -> torch.Tensor:
    """(3, H / block, W / block) float in [0, 1]: the photo averaged over block x block pixels, the
    most a window puts on one output pixel (so that a large photo is not aliased into a small
    clip); cached, as clips of one size share a few blocks."""
    photo = load_photo(name).float() / 255
    return F.avg_pool2d(photo[None], block)[0] if block > 1 else photo


@dataclass(frozen=True)
class Pan:
    """A camera move over one photo: square windows (centre y, x and side, as fractions of the
    photo's shorter side) at the first and the last frame."""

    photo: str
    start: tuple[float, float, float]
    end: tuple[float, float, float]

    @classmethod
    def draw(cls, generator: torch.Generator) -> Pan:
        """A photo, and two windows each 0.4-0.9 of its shorter side, inside it."""
        names = list(PHOTOS)
        photo = names[int(torch.randint(len(names), (1,), generator=generator))]
        return cls(photo, _window(generator), _window(generator))

    @property
    def subject(self) -> str:
        return PHOTOS[self.photo]

    def render(self, frames: int, height: int, width: int) -> torch.Tensor:
        """(3, frames, height, width) in [0, 1]: each frame's window of the photo, bilinear."""
        smallest = min(self.start[2], self.end[2]) * min(load_photo(self.photo).shape[1:])
        photo = averaged_photo(self.photo, max(1, int(smallest / height)))
        return pan_frames(photo, self.start, self.end, frames, height, width)


def _window(generator: torch.Generator) -> tuple[float, float, float]:
    side = 0.4 + 0.5 * torch.rand(1, generator=generator).item()
    cy, cx = (torch.rand(2, generator=generator) * (1 - side) + side / 2).tolist()
    return cy, cx, side


def pan_frames(photo: torch.Tensor, start: tuple[float, float, float], end: tuple[float, float, float],
               frames: int, height: int, width: int) -> torch.Tensor:
    """(3, H, W) photo -> (3, frames, height, width): windows interpolated linearly from ``start``
    to ``end`` ((centre y, centre x, side) in units of the photo's shorter side, centred on the
    photo's own centre for its longer side), each resampled with ``grid_sample`` (bilinear, the
    pixel-centre convention of ``F.interpolate(align_corners=False)``)."""
    window = torch.lerp(torch.tensor(start, dtype=torch.float64), torch.tensor(end, dtype=torch.float64),
                        torch.linspace(0, 1, frames, dtype=torch.float64)[:, None])  # (F, 3); one frame: start
    _, h, w = photo.shape
    short = min(h, w)
    # window centres and half sides in pixels of the photo, the square placed in its middle
    cy = window[:, 0] * short + (h - short) / 2
    cx = window[:, 1] * short + (w - short) / 2
    half = window[:, 2] * short / 2
    # output pixel centres within the window, then normalised to grid_sample's [-1, 1] over the photo
    u = (torch.arange(height, dtype=torch.float64) + 0.5) / height * 2 - 1
    v = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 2 - 1
    ys = (cy[:, None] + half[:, None] * u[None]) / h * 2 - 1          # (F, height)
    xs = (cx[:, None] + half[:, None] * v[None] * width / height) / w * 2 - 1  # (F, width)
    grid = torch.stack([xs[:, None, :].expand(-1, height, -1), ys[:, :, None].expand(-1, -1, width)], dim=-1)
    sampled = F.grid_sample(photo[None].expand(frames, -1, -1, -1), grid.float(), mode="bilinear",
                            padding_mode="border", align_corners=False)
    return sampled.permute(1, 0, 2, 3).contiguous()
