"""The frozen encoders a training step needs, behind one small interface.

Two kinds share it: the training-free stand-ins (``builtin``, no weights) and the real MfM
encoders loaded from local folders (``pretrained``: CogVideoX VAE, T5, Depth-Anything-V2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from megatron_mfm.encoders.builtin import HashedTextEncoder, LowFrequencyVideoCodec

MFM_VAE_SCALING_FACTOR = 0.958917567
"""The latent scale MfM was trained with: the official pipeline hard-codes it (pipeline_mfm.py,
``vae_scaling_factor = 0.958917567``) instead of reading the VAE config's value."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class VideoCodec(Protocol):
    def encode(self, pixels: torch.Tensor, generator: list[torch.Generator] | None = None) -> torch.Tensor:
        """``generator``: one per clip, for codecs that sample (the VAE posterior)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class TextEncoder(Protocol):
    max_length: int

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class DepthEstimator(Protocol):
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, H, W) depth."""
        ...


@dataclass
class FrozenEncoders:
    """Video to latents (and back), prompts to text states with a padding mask, and (optionally)
    depth of the frames a task reveals."""

    video: VideoCodec
    text: TextEncoder
    depth: DepthEstimator | None = None

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> float32 latents (B, 16, (F-1)/4+1, H/8, W/8); per-clip
        ``generators`` make a sampling codec's draws a function of the sample, so every pipeline
        stage (input on the first, target on the last) and every layout sees the same latents."""
        return self.video.encode(pixels.float(), generators).float()

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        return self.video.decode(latents.float()).float()

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (states (B, L, D) float32, mask (B, L) with 1 on real tokens), both on ``device``."""
        states, mask = self.text(prompts)
        return states.float().to(device), mask.float().to(device)

    @torch.no_grad()
    def estimate_depth(self, pixels: torch.Tensor, frames: Sequence[int]) -> torch.Tensor:
        """(3, F, H, W) -> depth (1, F, H, W) of ``frames`` only, zero elsewhere: the depth channel
        the task builders put in the condition (only the known frames of generation tasks)."""
        if self.depth is None:
            raise ValueError("no depth estimator: set depth_path in the encoder config (kind=pretrained)")
        depth = torch.zeros(1, *pixels.shape[1:], device=pixels.device)
        frames = list(frames)
        if frames:
            depth[0, frames] = self.depth(pixels[:, frames].transpose(0, 1)).to(depth)
        return depth

    def with_estimated_depth(self, condition: torch.Tensor, pixels: torch.Tensor, frames: Sequence[int]) -> torch.Tensor:
        """``condition`` (5, F, H, W) with the depth of ``frames`` estimated from ``pixels``
        (3, F, H, W); unchanged without a depth model or frames (real media with no depth model
        keep zero depth, as a depth-dropped sample)."""
        if self.depth is None or not frames:
            return condition
        condition = condition.clone()
        condition[3:4] = self.estimate_depth(pixels, frames).to(condition.dtype)
        return condition


def require_folder(field: str, path: str) -> None:
    """Weights load from local folders only: a missing one is named with its config field."""
    if not Path(path).is_dir():
        raise ValueError(f"{field}={path!r}: no such folder (weights load from local folders only)")


def builtin_encoders(text_width: int, max_length: int = 77, device: torch.device | str = "cpu") -> FrozenEncoders:
    """The training-free stand-ins (no weights needed): see ``encoders/builtin.py``; the text
    states are made on ``device``."""
    return FrozenEncoders(video=LowFrequencyVideoCodec(), text=HashedTextEncoder(text_width, max_length, device=device))


@dataclass
class EncoderConfig:
    """Which frozen encoders to use and where their weights are (local folders only)."""

    kind: str = "builtin"
    """builtin (training-free stand-ins) or pretrained (the weights below)."""
    vae_path: str = ""
    """Folder of a diffusers ``AutoencoderKLCogVideoX`` (config.json + weights), e.g. ``<pipeline>/vae``."""
    text_encoder_path: str = ""
    """Folder of a transformers ``T5EncoderModel``, e.g. ``<pipeline>/text_encoder``."""
    tokenizer_path: str = ""
    """Folder of the sentencepiece T5 tokenizer, e.g. ``<pipeline>/tokenizer``."""
    depth_path: str = ""
    """Folder of a Depth-Anything-V2 model + preprocessor_config.json; empty: no depth estimator."""
    dtype: str = "auto"
    """Weights and activations: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32."""
    vae_scaling_factor: float = MFM_VAE_SCALING_FACTOR
    """Latents = VAE posterior * this (MfM's value, not the CogVideoX VAE config's)."""
    sample_posterior: bool = True
    """Sample the VAE posterior (as the official MfM encode does) rather than take its mode."""
    vae_tiling: bool = False
    """Encode/decode large frames in overlapping tiles (less memory, slightly slower)."""
    vae_slicing: bool = False
    """Encode/decode a batch one clip at a time (less memory)."""
    text_max_length: int = 77
    """Text tokens (MfM: 77, padded and truncated)."""

    def __post_init__(self) -> None:
        if self.kind not in ("builtin", "pretrained"):
            raise ValueError(f"kind={self.kind!r}: choose builtin or pretrained")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose auto or one of {sorted(DTYPES)}")
        if self.vae_scaling_factor <= 0:
            raise ValueError(f"vae_scaling_factor={self.vae_scaling_factor} must be > 0")
        if self.text_max_length < 1:
            raise ValueError(f"text_max_length={self.text_max_length} must be >= 1")
        given = [name for name in ("vae_path", "text_encoder_path", "tokenizer_path", "depth_path") if getattr(self, name)]
        if self.kind == "builtin" and given:
            raise ValueError(f"{', '.join(given)} set but kind=builtin (the stand-ins): set kind=pretrained to use them")
        if self.kind == "pretrained":
            for name in ("vae_path", "text_encoder_path", "tokenizer_path"):
                if not getattr(self, name):
                    raise ValueError(f"{name} is required with kind=pretrained (a local folder)")
            for name in ("vae_path", "text_encoder_path", "tokenizer_path", "depth_path"):
                if getattr(self, name):
                    require_folder(name, getattr(self, name))

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return DTYPES[self.dtype]


def build_encoders(config: EncoderConfig, text_width: int | None, device: torch.device | str) -> FrozenEncoders:
    """The encoders ``config`` names, on ``device``. ``text_width`` is the model's
    ``text_hidden_size`` (a pretrained T5 of another width is refused); None skips that check."""
    if config.kind == "builtin":
        if text_width is None:
            raise ValueError("kind=builtin: the stand-in text encoder needs the model's text width")
        return builtin_encoders(text_width, config.text_max_length, device)
    from megatron_mfm.encoders.pretrained import load_pretrained_encoders

    return load_pretrained_encoders(config, text_width, torch.device(device))
