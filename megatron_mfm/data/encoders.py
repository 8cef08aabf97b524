"""The frozen encoders a training step needs, behind one small interface."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mfm.data.builtin_encoders import HashedTextEncoder, LowFrequencyVideoCodec


@dataclass
class FrozenEncoders:
    """Video to latents (and back) and prompts to text states with a padding mask."""

    video: LowFrequencyVideoCodec
    text: HashedTextEncoder

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.video.encode(pixels.float())

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        return self.video.decode(latents.float())

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = self.text(prompts)
        return states.to(device), mask.to(device)


def builtin_encoders(text_width: int) -> FrozenEncoders:
    """The training-free stand-ins (no weights needed): see ``data/builtin_encoders.py``."""
    return FrozenEncoders(video=LowFrequencyVideoCodec(), text=HashedTextEncoder(text_width))
