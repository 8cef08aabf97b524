"""Randomly initialised official-layout MfM pipeline folders (transformer/, scheduler/, vae/,
text_encoder/, tokenizer/ and a Depth-Anything-V2 folder beside them), built from configs in
code: nothing is downloaded. The tests use tiny ones, ``benchmarks/sampling_speed.py`` a
full-size MfM-2B transformer and CogVideoX VAE.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_height=32,
                sample_width=32)
SENTENCES = [
    "a red square moving right, number 0", "a green circle on a striped background",
    "a blue triangle moves up over a checkered floor", "#fps: 24. #task: text-to-video",
    "#task: image-to-video", "#task: video extending", "a grey picture of a still scene",
]


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


def save_depth_model(folder: Path, model: torch.nn.Module, input_side: int) -> None:
    """A Depth-Anything model and the DPT image processor config the official pipeline's
    ``depth-estimation`` pipeline and our estimator read (inputs of ``input_side`` pixels)."""
    model.save_pretrained(str(folder))
    processor = {"image_processor_type": "DPTImageProcessor", "do_resize": True,
                 "size": {"height": input_side, "width": input_side}, "keep_aspect_ratio": True,
                 "ensure_multiple_of": 14, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))


def save_scheduler(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))


def write_random_pipeline(root: Path, preset: str = "mfm-2b", device: torch.device | str = "cpu") -> dict[str, str]:
    """An official pipeline folder with a randomly initialised ``preset`` transformer (bf16
    safetensors), a CogVideoX VAE of CogVideoX's own configuration (diffusers' defaults; a tiny
    one with the tiny preset, for smoke tests), a 2-layer T5 of the transformer's text width
    (text encoding is a negligible share of a video; the real T5 is larger) and a depth model of
    Depth-Anything-V2-Small's size; returns the paths."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import (DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, T5Config,
                              T5EncoderModel, T5Tokenizer)

    from megatron_mfm.export.serving import save_weights
    from megatron_mfm.model.config import preset_config
    from megatron_mfm.model.dit import build_model
    from megatron_mfm.model.specs import local_layer_spec
    from megatron_mfm.parallel.initialize import initialize_parallel

    initialize_parallel()
    torch.manual_seed(0)
    config = preset_config(preset, use_cpu_initialization=torch.device(device).type == "cpu")
    with torch.device(device):
        save_weights(build_model(config, local_layer_spec()), root / "transformer", torch.bfloat16)
    save_tokenizer(root / "tokenizer")
    text_width, vocab = config.text_hidden_size, len(T5Tokenizer.from_pretrained(str(root / "tokenizer")))
    T5EncoderModel(T5Config(vocab_size=vocab, d_model=text_width, d_kv=64, d_ff=2 * text_width, num_layers=2,
                            num_heads=max(1, text_width // 64))).save_pretrained(str(root / "text_encoder"))
    AutoencoderKLCogVideoX(**(TINY_VAE if preset == "tiny" else {})).save_pretrained(str(root / "vae"))
    save_scheduler(root / "scheduler")
    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False)
    depth = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384, neck_hidden_sizes=[48, 96, 192, 384],
                                fusion_hidden_size=64, head_hidden_size=32, patch_size=14)
    save_depth_model(root / "depth", DepthAnythingForDepthEstimation(depth), 518)
    return {"pipeline": str(root), "depth": str(root / "depth")}
