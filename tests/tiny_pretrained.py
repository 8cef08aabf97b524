"""Tiny randomly initialised stand-ins of the real MfM encoders, saved as local folders in the
layouts the loaders read (nothing is downloaded): a sentencepiece T5 tokenizer, a
T5 encoder of the tiny preset's text width, a CogVideoX VAE and a Depth-Anything-V2 model."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.random_pipeline import TINY_VAE, save_depth_model, save_tokenizer
from megatron_mfm.encoders.interface import EncoderConfig
from megatron_mfm.model.presets import PRESETS

TEXT_WIDTH = PRESETS["tiny"]["text_hidden_size"]
DEPTH_INPUT = 56


def save_text_encoder(folder: Path, vocab_size: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=TEXT_WIDTH, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
    T5EncoderModel(config).save_pretrained(str(folder))


def save_vae(folder: Path) -> None:
    from diffusers import AutoencoderKLCogVideoX

    AutoencoderKLCogVideoX(**TINY_VAE).save_pretrained(str(folder))


def save_depth(folder: Path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                            patch_size=14, image_size=28, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False, initializer_range=0.2)
    # initializer_range 0.2 (not 0.02): depths of order 1 rather than 1e-8, so comparisons mean something
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 8, 8],
                                 fusion_hidden_size=8, head_hidden_size=8, patch_size=14, initializer_range=0.2)
    torch.manual_seed(0)  # a draw whose depths are not mostly cut to zero by the final ReLU
    save_depth_model(folder, DepthAnythingForDepthEstimation(config), DEPTH_INPUT)


def save_tiny_pretrained(root: Path, depth: bool = True) -> dict[str, str]:
    """Write the folders under ``root``; returns the EncoderConfig path fields."""
    from transformers import T5Tokenizer

    torch.manual_seed(0)
    paths = {"tokenizer_path": root / "tokenizer", "text_encoder_path": root / "text_encoder", "vae_path": root / "vae"}
    save_tokenizer(paths["tokenizer_path"])
    save_text_encoder(paths["text_encoder_path"], len(T5Tokenizer.from_pretrained(str(paths["tokenizer_path"]))))
    save_vae(paths["vae_path"])
    if depth:
        paths["depth_path"] = root / "depth"
        save_depth(paths["depth_path"])
    return {name: str(path) for name, path in paths.items()}


def tiny_config(paths: dict[str, str], **options) -> EncoderConfig:
    """Float32 on the CPU, the VAE's posterior mode (deterministic) unless overridden."""
    return EncoderConfig(**{"kind": "pretrained", "dtype": "float32", "sample_posterior": False, **paths, **options})
