"""Training-free stand-ins for the frozen encoders, for the CPU demo and tests.

The real MfM encoders (CogVideoX VAE, T5, Depth-Anything-V2) need weights that cannot be
downloaded here. These keep the real interfaces and shapes:

- ``LowFrequencyVideoCodec``: latents with the CogVideoX shape (16 channels, 4x time, 8x space,
  (F-1)/4+1 frames). Each 8x8 RGB patch is projected onto its 16 lowest-frequency orthonormal
  DCT basis vectors; frame 0 is encoded alone and later frames in groups of 4 (averaged).
  Decoding is the transpose: a low-pass, frame-held reconstruction. Invertible on its range.
- ``HashedTextEncoder``: a fixed random vector per word (stable hash) plus a sinusoidal position
  code, 77 tokens with a padding mask; similar captions get similar embeddings.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from einops import rearrange

LATENT_CHANNELS = 16
PATCH = 8
TIME_STRIDE = 4


def _dct_basis(n: int) -> torch.Tensor:
    """Orthonormal 1D DCT-II basis (n, n): row k is frequency k."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    x = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * x + 1) * k / (2 * n))
    basis[0] /= math.sqrt(2)
    return basis * math.sqrt(2 / n)


def _low_frequency_basis() -> torch.Tensor:
    """(16, 3*8*8) orthonormal rows: per frequency (by u+v, then u), one row per RGB channel."""
    dct = _dct_basis(PATCH)
    freqs = sorted(((u, v) for u in range(PATCH) for v in range(PATCH)), key=lambda f: (f[0] + f[1], f[0]))
    rows = []
    for u, v in freqs:
        pattern = torch.outer(dct[u], dct[v])  # (8, 8)
        for channel in range(3):
            row = torch.zeros(3, PATCH, PATCH, dtype=torch.float64)
            row[channel] = pattern
            rows.append(row.flatten())
            if len(rows) == LATENT_CHANNELS:
                return torch.stack(rows).float()
    raise AssertionError("unreachable")


class LowFrequencyVideoCodec:
    """Pixels (B, 3, F, H, W) in [-1, 1] <-> latents (B, 16, (F-1)/4+1, H/8, W/8)."""

    scaling_factor = 0.25  # keeps latents near unit scale (the DC row is 8x the patch mean)

    def __init__(self):
        self.basis = _low_frequency_basis()

    def encode(self, pixels: torch.Tensor, generator: list[torch.Generator] | None = None) -> torch.Tensor:
        """Deterministic: ``generator`` is accepted for the codec interface and unused."""
        frames = pixels.shape[2]
        if (frames - 1) % TIME_STRIDE:
            raise ValueError(f"video of {frames} frames: the codec needs 4k+1 frames")
        first, rest = pixels[:, :, :1], pixels[:, :, 1:]
        groups = [first] + ([rest.unflatten(2, (-1, TIME_STRIDE)).mean(dim=3)] if frames > 1 else [])
        grouped = torch.cat(groups, dim=2)  # (B, 3, T, H, W)
        patches = rearrange(grouped, "b c t (h p) (w q) -> b t h w (c p q)", p=PATCH, q=PATCH)
        latents = patches @ self.basis.to(patches).T * self.scaling_factor
        return rearrange(latents, "b t h w c -> b c t h w")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        patches = rearrange(latents, "b c t h w -> b t h w c") / self.scaling_factor @ self.basis.to(latents)
        frames = rearrange(patches, "b t h w (c p q) -> b c t (h p) (w q)", c=3, p=PATCH, q=PATCH)
        held = [frames[:, :, :1]] + ([frames[:, :, 1:].repeat_interleave(TIME_STRIDE, dim=2)] if frames.shape[2] > 1 else [])
        return torch.cat(held, dim=2).clamp(-1, 1)


class HashedTextEncoder:
    """Prompts -> (states (B, 77, width), mask (B, 77)) on ``device``; deterministic and
    parameter-free."""

    def __init__(self, width: int, max_length: int = 77, seed: int = 0, device: torch.device | str = "cpu"):
        self.width, self.max_length, self.seed = width, max_length, seed
        self.device = torch.device(device)
        position = torch.arange(max_length, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float32) / width)
        positions = torch.zeros(max_length, width)
        positions[:, 0::2] = torch.sin(position * freq)
        positions[:, 1::2] = torch.cos(position * freq[: width // 2])
        self.positions = positions.to(self.device)
        self._rows: dict[str, int] = {}  # word -> its row in the table
        self._vectors: list[torch.Tensor] = []
        self._table: torch.Tensor | None = None

    @staticmethod
    def tokenize(prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", prompt.lower())

    def _word_row(self, word: str) -> int:
        """The row of ``word`` in the vector table (drawn once per word, from its stable hash)."""
        if word not in self._rows:
            g = torch.Generator().manual_seed(zlib.crc32(word.encode()) ^ self.seed)
            self._vectors.append(torch.randn(self.width, generator=g))
            self._table = None
            self._rows[word] = len(self._rows) + 1
        return self._rows[word]

    def _word_table(self) -> torch.Tensor:
        """(1 + words, width) on the device: row 0 zero (padding), then each seen word's vector."""
        if self._table is None:
            self._table = torch.stack([torch.zeros(self.width), *self._vectors]).to(self.device)
        return self._table

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One gather for the whole batch, on the device: the states never cross the host link,
        and a step's prompts cost a fixed handful of ops (an H200 step of 64 spent ~50 ms on
        this work on the host)."""
        rows = []
        for prompt in prompts:
            words = (self.tokenize(prompt) + ["</s>"])[: self.max_length]  # an end token, as T5
            rows.append([self._word_row(word) for word in words] + [0] * (self.max_length - len(words)))
        rows = torch.tensor(rows, dtype=torch.long).view(len(prompts), self.max_length).to(self.device)
        real = rows > 0
        states = torch.where(real[..., None], self._word_table()[rows] + 0.1 * self.positions, 0.0)
        return states, real.float()
