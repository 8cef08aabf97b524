"""Loading the real MfM frozen encoders from local folders (never from the network).

The folders are those of the official diffusers pipeline (``vae/``, ``text_encoder/``,
``tokenizer/``) and a transformers Depth-Anything-V2 model (the official inference default is
Depth-Anything-V2-Small). Every failure names the config field and the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_mfm.encoders.interface import EncoderConfig, FrozenEncoders, require_folder
from megatron_mfm.encoders.depth import DepthAnythingEstimator, DepthPreprocessing
from megatron_mfm.encoders.text import T5TextEncoder
from megatron_mfm.encoders.vae import CogVideoXCodec


def load_local(load: Callable[..., Any], field: str, path: str, **kwargs) -> Any:
    """``load(path, local_files_only=True, **kwargs)``, with errors that name ``field`` and ``path``."""
    require_folder(field, path)
    try:
        return load(path, local_files_only=True, **kwargs)
    except Exception as error:
        raise ValueError(f"{field}={path!r}: cannot load ({type(error).__name__}: {error})") from error


def load_depth_estimator(path: str, dtype: torch.dtype, device: torch.device) -> DepthAnythingEstimator:
    from transformers import AutoModelForDepthEstimation

    model = load_local(AutoModelForDepthEstimation.from_pretrained, "depth_path", path, dtype=dtype).to(device)
    processor_file = Path(path) / "preprocessor_config.json"
    if not processor_file.is_file():
        raise ValueError(f"depth_path={path!r}: {processor_file.name} is missing (the depth input normalisation)")
    preprocessing = DepthPreprocessing.from_processor_config(json.loads(processor_file.read_text()), str(processor_file))
    return DepthAnythingEstimator(model, preprocessing)


def load_pretrained_encoders(config: EncoderConfig, text_width: int | None, device: torch.device) -> FrozenEncoders:
    """CogVideoX VAE + T5 (+ Depth-Anything-V2 when ``config.depth_path``) on ``device``."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5EncoderModel, T5Tokenizer

    dtype = config.torch_dtype(device)
    tokenizer = load_local(T5Tokenizer.from_pretrained, "tokenizer_path", config.tokenizer_path)
    encoder = load_local(T5EncoderModel.from_pretrained, "text_encoder_path", config.text_encoder_path, dtype=dtype)
    text = T5TextEncoder(tokenizer, encoder.to(device), config.text_max_length)
    if text_width is not None and text.width != text_width:
        raise ValueError(f"text_encoder_path={config.text_encoder_path!r}: T5 width d_model={text.width} differs from "
                         f"the model's text_hidden_size={text_width}")
    vae = load_local(AutoencoderKLCogVideoX.from_pretrained, "vae_path", config.vae_path, torch_dtype=dtype)
    video = CogVideoXCodec(vae.to(device), config.vae_scaling_factor, config.sample_posterior,
                           tiling=config.vae_tiling, slicing=config.vae_slicing)
    # float32 whatever ``dtype``: the official pipeline never casts its depth model
    depth = load_depth_estimator(config.depth_path, torch.float32, device) if config.depth_path else None
    return FrozenEncoders(video=video, text=text, depth=depth)
