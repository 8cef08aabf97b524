"""Latent and token geometry of MfM, the one place these numbers live.

The CogVideoX VAE keeps the first frame and compresses each further 4 frames into one latent
frame, compresses space 8x, and gives 16 channels; the DiT cuts each latent frame into 2x2
patches, one token each. Pure arithmetic: importable without megatron or torch.
"""

from __future__ import annotations

LATENT_CHANNELS = 16
"""Channels of a VAE latent (and of the velocity the DiT predicts)."""
TEMPORAL_COMPRESSION = 4
"""Pixel frames per latent frame after the first."""
SPATIAL_COMPRESSION = 8
"""Pixels per latent along height and width."""
PATCH_SIZE = 2
"""Latents per token along height and width (the temporal patch is one latent frame)."""
PIXELS_PER_TOKEN_SIDE = SPATIAL_COMPRESSION * PATCH_SIZE
"""Pixels per token along height and width."""


def latent_frames(frames: int) -> int:
    """Latent frames of a clip of ``frames`` pixel frames (1 for an image)."""
    return (frames - 1) // TEMPORAL_COMPRESSION + 1


def pixel_frames(latent_frame_count: int) -> int:
    """Pixel frames that ``latent_frame_count`` latent frames decode to."""
    return TEMPORAL_COMPRESSION * (latent_frame_count - 1) + 1


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, T, H, W) of the latent of a (3, frames, height, width) clip."""
    return (LATENT_CHANNELS, latent_frames(frames), height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)


def pixel_shape(latent_grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """(frames, height, width) of the clip behind a (T, H, W) latent grid."""
    t, h, w = latent_grid
    return pixel_frames(t), h * SPATIAL_COMPRESSION, w * SPATIAL_COMPRESSION


def token_grid(latent_grid: tuple[int, int, int], patch_size: int = PATCH_SIZE) -> tuple[int, int, int]:
    """(t, h, w) tokens of a (T, H, W) latent grid."""
    t, h, w = latent_grid
    return t, h // patch_size, w // patch_size


def clip_tokens(frames: int, height: int, width: int) -> int:
    """DiT tokens of one (frames, height, width) clip."""
    t, h, w = token_grid(latent_shape(frames, height, width)[1:])
    return t * h * w
