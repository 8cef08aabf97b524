"""Random masks for inpainting and outpainting: 1 = known pixel, 0 = to generate."""

from __future__ import annotations

import math

import torch

TEST_ELEMENTS = 1 << 22
"""Pixel-dab distances ``brush_mask`` holds at once (16 MiB of float32)."""


def box_mask(height: int, width: int, generator: torch.Generator, max_boxes: int = 3) -> torch.Tensor:
    """1-``max_boxes`` rectangular holes, each 10-50% of each side."""
    mask = torch.ones(height, width)
    for _ in range(int(torch.randint(1, max_boxes + 1, (1,), generator=generator))):
        bh = max(1, int(height * (0.1 + 0.4 * torch.rand(1, generator=generator).item())))
        bw = max(1, int(width * (0.1 + 0.4 * torch.rand(1, generator=generator).item())))
        top = int(torch.randint(0, height - bh + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - bw + 1, (1,), generator=generator))
        mask[top:top + bh, left:left + bw] = 0
    return mask


def brush_mask(height: int, width: int, generator: torch.Generator, strokes: int = 4) -> torch.Tensor:
    """Free-form holes: random walks of thick round brush strokes (the dabs' centres are drawn
    first, then every pixel is tested against all of them at once)."""
    radius = max(1.0, 0.06 * min(height, width))
    dabs = torch.linspace(0, 1, 8).tolist()
    centres_y, centres_x = [], []
    for _ in range(strokes):
        y = torch.rand(1, generator=generator).item() * height
        x = torch.rand(1, generator=generator).item() * width
        for _ in range(int(torch.randint(3, 8, (1,), generator=generator))):
            angle = torch.rand(1, generator=generator).item() * 2 * math.pi
            length = (0.1 + 0.2 * torch.rand(1, generator=generator).item()) * max(height, width)
            centres_y += [y + step * length * math.sin(angle) for step in dabs]
            centres_x += [x + step * length * math.cos(angle) for step in dabs]
            y = min(max(y + length * math.sin(angle), 0), height - 1)
            x = min(max(x + length * math.cos(angle), 0), width - 1)
    dx2 = (torch.arange(width, dtype=torch.float32)[:, None] - torch.tensor(centres_x)) ** 2  # (W, dabs)
    rows = torch.arange(height, dtype=torch.float32)[:, None] - torch.tensor(centres_y)  # (H, dabs)
    chunk = max(1, TEST_ELEMENTS // dx2.numel())  # rows tested at once: bounded memory at any size
    brushed = torch.cat([(dy[:, None] ** 2 + dx2 <= radius**2).any(dim=-1) for dy in rows.split(chunk)])
    return (~brushed).float()


def border_mask(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Outpainting: a known centre region; each side loses 0-35% (at least one side > 10%)."""
    cuts = torch.rand(4, generator=generator) * 0.35
    cuts[int(torch.randint(0, 4, (1,), generator=generator))] = 0.1 + 0.25 * torch.rand(1, generator=generator).item()
    top, bottom = int(cuts[0] * height), height - int(cuts[1] * height)
    left, right = int(cuts[2] * width), width - int(cuts[3] * width)
    mask = torch.zeros(height, width)
    mask[top:max(bottom, top + 1), left:max(right, left + 1)] = 1
    return mask


def inpainting_mask(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes or brush strokes with equal probability."""
    if torch.rand(1, generator=generator).item() < 0.5:
        return box_mask(height, width, generator)
    return brush_mask(height, width, generator)
