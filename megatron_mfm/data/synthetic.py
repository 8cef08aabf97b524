"""A built-in synthetic dataset: procedurally rendered scenes of moving shapes on textures.

Every sample is a pure function of (seed, index): coloured circles, squares and triangles move
across a striped, checkered, gradient or plain background, or a photograph the camera pans and
zooms over (``photo``: scikit-image's sample photos, ``data/photos.py``); the caption says what moves where,
the depth map knows which shape is in front, and an "edit source" renders the same scene with
other colours (a video-editing pair whose caption describes the edited clip). Images are single
static frames. No downloads, any resolution and frame count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_mfm.data.photos import Pan, require_photos
from megatron_mfm.tasks.builders import Clip

COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.0), "white": (0.95, 0.95, 0.95), "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("plain", "striped", "checkered", "gradient")
PHOTO_BACKGROUND = "photo"
"""A photograph panned and zoomed over (needs the ``photos`` extra, so not among the defaults)."""
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}


@dataclass
class SyntheticConfig:
    """Size and mix of the synthetic data."""

    num_samples: int = 100_000
    """Samples in one epoch (indices wrap around)."""
    frames: int = 17
    """Frames of a video (4k+1)."""
    height: int = 64
    width: int = 64
    image_fraction: float = 0.3
    """Share of samples that are single images."""
    fps: float = 16.0
    seed: int = 0
    max_objects: int = 3
    """Shapes per scene: 1 to this many."""
    backgrounds: list[str] = field(default_factory=lambda: list(BACKGROUNDS))
    """Background kinds drawn from (plain, striped, checkered, gradient, photo); fewer make easier data."""
    workers: int = 0
    """Processes rendering the next steps' micro-batches while the model trains (0: render in
    the step, on its critical path)."""
    prefetch_steps: int = 2
    """Steps rendered ahead with ``workers`` (at least enough for one micro-batch a worker)."""

    def __post_init__(self) -> None:
        if self.workers < 0 or self.prefetch_steps < 0:
            raise ValueError("data.synthetic.workers and prefetch_steps must be >= 0")
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"data.synthetic.frames={self.frames} must be 4k+1 (the VAE compresses time 4x)")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"data.synthetic height/width {self.height}x{self.width} must be multiples of 16")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ValueError("data.synthetic.image_fraction must be within [0, 1]")
        if self.max_objects < 1:
            raise ValueError(f"data.synthetic.max_objects={self.max_objects} must be >= 1")
        kinds = [*BACKGROUNDS, PHOTO_BACKGROUND]
        unknown = sorted(set(self.backgrounds) - set(kinds))
        if unknown or not self.backgrounds:
            raise ValueError(f"data.synthetic.backgrounds: {unknown or 'empty'}; choose from {kinds}")
        if PHOTO_BACKGROUND in self.backgrounds:
            require_photos()


def _background(kind: str, color: torch.Tensor, other: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                period: float) -> torch.Tensor:
    if kind == "plain":
        weight = torch.zeros_like(ys)
    elif kind == "striped":
        weight = (torch.sin(2 * math.pi * xs / period) > 0).float()
    elif kind == "checkered":
        weight = ((torch.floor(xs / period) + torch.floor(ys / period)) % 2).float()
    else:  # gradient
        weight = ys / ys.max().clamp_min(1)
    return color[:, None, None] * (1 - weight) + other[:, None, None] * weight


def _shape_mask(shape: str, ys: torch.Tensor, xs: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor,
                r: float) -> torch.Tensor:
    """Pixels inside the shape; ``cy``, ``cx`` (F, 1, 1) per-frame centres against (H, W) grids."""
    if shape == "circle":
        return ((ys - cy) ** 2 + (xs - cx) ** 2) <= r**2
    if shape == "square":
        return ((ys - cy).abs() <= r) & ((xs - cx).abs() <= r)
    # triangle pointing up: inside the box, below the two slanted edges
    dy = ys - (cy - r)
    return (dy >= 0) & (dy <= 2 * r) & ((xs - cx).abs() <= dy / 2)


def _frame_centres(obj: dict, frames: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, 1, 1) float32 pixel centres of a moving shape, computed in double as a scalar would be."""
    dy, dx = DIRECTIONS[obj["direction"]]
    progress = [f / max(frames - 1, 1) for f in range(frames)]
    cy = [(obj["cy"] + dy * obj["speed"] * p) * h for p in progress]
    cx = [(obj["cx"] + dx * obj["speed"] * p) * w for p in progress]
    return torch.tensor(cy).view(-1, 1, 1), torch.tensor(cx).view(-1, 1, 1)


class SyntheticVideoDataset:
    """Map-style dataset of ``Clip``s; ``dataset[i]`` is deterministic."""

    def __init__(self, config: SyntheticConfig):
        self.config = config

    def __len__(self) -> int:
        return self.config.num_samples

    def __getitem__(self, index: int) -> Clip:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index % self.config.num_samples)
        return self.clip(index, is_image=torch.rand(1, generator=g).item() < self.config.image_fraction)

    def clip(self, index: int, is_image: bool) -> Clip:
        """Sample ``index`` rendered as an image or a video (the loader picks per micro-batch)."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index % cfg.num_samples + 7)
        pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
        rand = lambda: torch.rand(1, generator=g).item()  # noqa: E731
        frames = 1 if is_image else cfg.frames
        names = list(COLORS)
        bg_kind, bg_name, bg_other = pick(cfg.backgrounds), pick(names), pick(names)
        objects = []
        for _ in range(1 + int(torch.randint(cfg.max_objects, (1,), generator=g))):
            objects.append(dict(
                shape=pick(SHAPES), color=pick(names), edit_color=pick(names), direction=pick(list(DIRECTIONS)),
                cy=0.2 + 0.6 * rand(), cx=0.2 + 0.6 * rand(), r=0.08 + 0.1 * rand(), speed=0.2 + 0.4 * rand(),
                depth=0.3 + 0.7 * rand(),
            ))
        objects.sort(key=lambda o: o["depth"])  # far to near: nearer shapes drawn last
        pan = Pan.draw(g) if bg_kind == PHOTO_BACKGROUND else None
        pixels, source, depth = self._render(objects, bg_kind, bg_name, bg_other, frames, pan)
        background = f"a photo of {pan.subject}" if pan else (
            f"a {bg_name} background" if bg_kind == "plain" else f"a {bg_name} {bg_kind} background")
        return Clip(
            pixels=pixels,
            caption=self._caption(objects, background, is_image),
            fps=cfg.fps,
            depth=depth,
            edit_source=None if is_image else source,
            key=f"synthetic/{cfg.seed}/{index}",
        )

    def _render(self, objects: list[dict], bg_kind: str, bg_name: str, bg_other: str, frames: int,
                pan: Pan | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixels, edit source, depth): the shapes' masks are computed once for all frames and
        both colourings; each pixel shows the nearest shape covering it (objects sorted far to near).
        The background is one image (3, H, W), or with ``pan`` a frame each (3, F, H, W)."""
        cfg = self.config
        h, w = cfg.height, cfg.width
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        background = pan.render(frames, h, w) if pan else _background(
            bg_kind, torch.tensor(COLORS[bg_name]), torch.tensor(COLORS[bg_other]), ys, xs, max(4.0, w / 8))
        owner = torch.full((frames, h, w), -1)  # index of the nearest shape on each pixel, -1: background
        for number, obj in enumerate(objects):
            cy, cx = _frame_centres(obj, frames, h, w)
            owner[_shape_mask(obj["shape"], ys, xs, cy, cx, obj["r"] * min(h, w))] = number
        # One lookup paints everything: 7 channels (RGB, edited RGB, depth) from a table whose
        # first columns are the shapes' values and the rest the background's, pixel by pixel.
        shapes = torch.tensor([[*COLORS[o["color"]], *COLORS[o["edit_color"]], o["depth"]] for o in objects]).T
        ground = torch.cat([background, background, torch.full((1, *background.shape[1:]), 0.1)]).flatten(1)
        table = torch.cat([shapes, ground], dim=1)
        table[:6] = table[:6] * 2 - 1  # RGB to [-1, 1]
        pixel = torch.arange(len(objects), len(objects) + ground.shape[1]).view(background.shape[1:])
        painted = table.index_select(1, torch.where(owner >= 0, owner, pixel).flatten()).view(7, frames, h, w)
        return painted[:3], painted[3:6], painted[6:]

    @staticmethod
    def _caption(objects, background: str, is_image) -> str:
        parts = []
        for obj in objects:
            text = f"a {obj['color']} {obj['shape']}"
            parts.append(text if is_image else f"{text} moving {obj['direction']}")
        return f"{' and '.join(parts)} on {background}"
