"""A packed micro-batch of three shapes and its reference: every sample run alone."""

from __future__ import annotations

import torch

from megatron_mfm.model import MfMDiT
from mfm_cases import TINY

TEXT_LENGTH = 7
SHAPES = [(2, 1, 4, 6), (1, 3, 4, 4), (1, 1, 6, 6)]
"""(samples, latent frames, height, width) per group: 2 images of 2 x 3 tokens, a clip of
3 x 2 x 2 tokens and an image of 3 x 3: 6 + 6 + 12 + 9 = 33 tokens (padded under CP and SP)."""


def packed_inputs(seed: int = 3) -> dict:
    """The forward's arguments for one packed sequence of ``SHAPES`` (4 samples)."""
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(b, 16, t, h, w, generator=g) for b, t, h, w in SHAPES]
    condition = [torch.randn(b, 5, 4 * (t - 1) + 1, 8 * h, 8 * w, generator=g) for b, t, h, w in SHAPES]
    samples = sum(b for b, *_ in SHAPES)
    text_mask = torch.ones(samples, TEXT_LENGTH)
    text_mask[0, 4:] = 0
    text_mask[2, 2:] = 0
    return dict(latents=latents, timestep=torch.tensor([937.0, 41.0, 500.0, 3.0]),
                text=torch.randn(samples, TEXT_LENGTH, TINY["text_dim"], generator=g), text_mask=text_mask,
                condition=condition, motion_score=torch.tensor([5.0, 0.0, 2.0, 1.0]))


def one_sample(inputs: dict, group: int, row: int, sample: int) -> dict:
    """The unpacked forward's arguments for one sample of the packed inputs (batch 1)."""
    pick = slice(sample, sample + 1)
    return dict(latents=inputs["latents"][group][row:row + 1], timestep=inputs["timestep"][pick],
                text=inputs["text"][pick], text_mask=inputs["text_mask"][pick],
                condition=inputs["condition"][group][row:row + 1], motion_score=inputs["motion_score"][pick])


def samples_alone(model: MfMDiT, inputs: dict) -> list[torch.Tensor]:
    """Each group's velocity with every sample run through the unpacked forward on its own."""
    outputs, sample = [], 0
    for group, latents in enumerate(inputs["latents"]):
        rows = []
        for row in range(latents.shape[0]):
            rows.append(model(**one_sample(inputs, group, row, sample)))
            sample += 1
        outputs.append(torch.cat(rows))
    return outputs


def weighted_sum(outputs: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """A scalar that reads every output element (its gradient checks the backward)."""
    return sum((out * w).sum() for out, w in zip(outputs, weights))


def output_weights(seed: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 16, t, h, w, generator=g) for b, t, h, w in SHAPES]
