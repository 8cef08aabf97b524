"""Tiny randomly initialised stand-ins of the real MfM encoders, saved as local folders in the
layouts the loaders read (nothing is downloaded): a sentencepiece T5 tokenizer trained here, a
T5 encoder of the tiny preset's text width, a CogVideoX VAE and a Depth-Anything-V2 model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_mfm.encoders.interface import EncoderConfig
from megatron_mfm.model.presets import PRESETS

TEXT_WIDTH = PRESETS["tiny"]["text_hidden_size"]
SENTENCES = [
    "a red square moving right, number 0", "a green circle on a striped background",
    "a blue triangle moves up over a checkered floor", "#fps: 24. #task: text-to-video",
    "#task: image-to-video", "#task: video extending", "a grey picture of a still scene",
]
DEPTH_INPUT = {"height": 56, "width": 56}


def save_tokenizer(folder: Path) -> None:
    """A lower-case sentencepiece unigram model with T5's special ids, wrapped as a T5 tokenizer."""
    import sentencepiece
    from transformers import T5Tokenizer

    raw = folder.with_name(folder.name + "-spm")
    raw.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_prefix=str(raw / "spiece"), vocab_size=80, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    T5Tokenizer.from_pretrained(str(raw), extra_ids=0).save_pretrained(str(folder))


def save_text_encoder(folder: Path, vocab_size: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=TEXT_WIDTH, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
    T5EncoderModel(config).save_pretrained(str(folder))


def save_vae(folder: Path) -> None:
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                 sample_height=32, sample_width=32)
    vae.save_pretrained(str(folder))


def save_depth(folder: Path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                            patch_size=14, image_size=28, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False, initializer_range=0.2)
    # initializer_range 0.2 (not 0.02): depths of order 1 rather than 1e-8, so comparisons mean something
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 8, 8],
                                 fusion_hidden_size=8, head_hidden_size=8, patch_size=14, initializer_range=0.2)
    torch.manual_seed(0)  # a draw whose depths are not mostly cut to zero by the final ReLU
    DepthAnythingForDepthEstimation(config).save_pretrained(str(folder))
    processor = {"image_processor_type": "DPTImageProcessor", "do_resize": True, "size": DEPTH_INPUT,
                 "keep_aspect_ratio": True, "ensure_multiple_of": 14, "resample": 3, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
                 "image_std": [0.229, 0.224, 0.225]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))


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
