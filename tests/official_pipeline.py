"""The official MfM pipeline (github leeruibin/MfM, ``MfMPipeline``) on tiny random components,
called as the official ``infer_mfm_pipeline.py`` calls it, for parity tests.

The checkout comes from MFM_OFFICIAL_REPO (tests skip without it). Its pipeline module imports
decord and torchvision at import time; where they are not installed, stand-ins serve the few calls
it makes (decord: frames of a video read with PyAV; torchvision: ToTensor, Normalize and
rgb_to_grayscale as torchvision documents them) only while the module is imported.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

OFFICIAL_REPO = os.environ.get("MFM_OFFICIAL_REPO", "")
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    return module


def _decord_stand_in() -> types.ModuleType:
    from megatron_mfm.utils.media import read_video

    class Frame:
        def __init__(self, array):
            self.array = array

        def asnumpy(self):
            return self.array

    class VideoReader:
        def __init__(self, path, ctx=None):
            self.frames = read_video(path)

        def __len__(self):
            return len(self.frames)

        def __getitem__(self, index):
            return Frame(self.frames[index])

    return _module("decord", VideoReader=VideoReader, cpu=lambda index=0: None, gpu=lambda index=0: None)


def _torchvision_stand_ins() -> dict[str, types.ModuleType]:
    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, value):
            for step in self.steps:
                value = step(value)
            return value

    class ToTensor:
        def __call__(self, image):
            array = np.array(image)
            array = array[:, :, None] if array.ndim == 2 else array
            return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, tensor):
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
            return tensor.sub(mean).div(torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1))

    def rgb_to_grayscale(image, num_output_channels=1):
        r, g, b = image.unbind(dim=-3)
        grey = (0.2989 * r + 0.587 * g + 0.114 * b).to(image.dtype).unsqueeze(dim=-3)
        return grey.expand(image.shape) if num_output_channels == 3 else grey

    functional = _module("torchvision.transforms.functional", rgb_to_grayscale=rgb_to_grayscale)
    transforms = _module("torchvision.transforms", Compose=Compose, ToTensor=ToTensor, Normalize=Normalize,
                         functional=functional)
    return {"torchvision": _module("torchvision", transforms=transforms), "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional}


def official_pipeline_class(repo: Path):
    """``MfMPipeline`` from the checkout, importing its missing third-party modules as stand-ins."""
    import diffusers  # noqa: F401  (their availability checks run before any stand-in exists)
    import transformers.pipelines  # noqa: F401

    from tools.official_repo import official_module

    official_module(repo, "mfm.modeling.transformer_3d")
    stand_ins = {}
    if importlib.util.find_spec("decord") is None:
        stand_ins["decord"] = _decord_stand_in()
    if importlib.util.find_spec("torchvision") is None:
        stand_ins.update(_torchvision_stand_ins())
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("mfm.pipelines.pipeline_mfm").MfMPipeline
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def write_pipeline_folder(root: Path, seed: int = 3) -> dict[str, str]:
    """A tiny random official pipeline folder (transformer/, scheduler/, vae/, text_encoder/,
    tokenizer/) and a Depth-Anything-V2 folder beside it; returns their paths."""
    from megatron_mfm.export.official_io import write_official
    from megatron_mfm.model.config import make_config, to_official_config
    from mfm_cases import make_reference, megatron_config_kwargs
    from tiny_pretrained import TEXT_WIDTH, save_tiny_pretrained

    root.mkdir(parents=True, exist_ok=True)
    paths = save_tiny_pretrained(root)
    vae_config = root / "vae" / "config.json"  # tiles of 6x5 latents: the tiled decode covers the frame exactly
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "sample_height": 96, "sample_width": 80}))
    config = make_config(**megatron_config_kwargs(text_dim=TEXT_WIDTH))
    write_official(root / "transformer", to_official_config(config), make_reference(seed=seed, text_dim=TEXT_WIDTH).state_dict())
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    return {"pipeline": str(root), "depth": paths["depth_path"]}


def load_official_pipeline(repo: Path, folders: dict[str, str]):
    """The official pipeline as infer_mfm_pipeline.py builds it (float32, CPU)."""
    from diffusers import AutoencoderKLCogVideoX, FlowMatchEulerDiscreteScheduler
    from transformers import T5EncoderModel, T5Tokenizer, pipeline

    pipeline_class = official_pipeline_class(repo)
    from mfm.modeling.transformer_3d import Transformer3DModel

    root = Path(folders["pipeline"])
    official = pipeline_class(
        tokenizer=T5Tokenizer.from_pretrained(str(root / "tokenizer")),
        text_encoder=T5EncoderModel.from_pretrained(str(root / "text_encoder")),
        vae=AutoencoderKLCogVideoX.from_pretrained(str(root / "vae")),
        depth_pipe=pipeline(task="depth-estimation", model=folders["depth"], device="cpu"),
        transformer=Transformer3DModel.from_pretrained(str(root / "transformer"), torch_dtype=torch.float32),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(root / "scheduler")),
    )
    official.transformer.post_setup_sequence_parallel(None)
    official.set_progress_bar_config(disable=True)
    return official


TASK_MAP = {"t2i": "text-to-image", "icolor": "image colorization", "isr": "image super-resolution",
            "iinp": "image inpainting", "ioutp": "image outpainting", "t2v": "text-to-video", "i2v": "image-to-video",
            "vexd": "video extending", "itrans": "image-to-image transition", "vtrans": "video-to-video transition",
            "vedit": "video editing", "vcolor": "video colorization", "vsr": "video super-resolution",
            "vinp": "video inpainting", "voutp": "video outpainting"}
NEGATIVE = ("static, watermark, subtitles, scene change, flickering, distorted, discontinuous, bad anatomy, bad hands, "
            "missing fingers, cropped, ugly, blurry, low resolution, low quality, motionless, cartoon, animation, "
            "oil painting, #reverse, #motion: super-fast, #backplay, human distortion, unnatural movement")


def run_official_script_step(official, task: str, prompt: str, input_path, mask_path, frames: int, height: int,
                             width: int, steps: int, seed: int) -> torch.Tensor:
    """One prompt of infer_mfm_pipeline.py's main loop at its defaults (as transcribed from it:
    per-task settings, the pipeline call, the trim of a 4k-frame output); the clip (3, F, H, W)."""
    added, negative, guidance, motion = "#FPS: 16.", NEGATIVE, 6.0, 5.0
    if task in ("t2i", "isr", "icolor", "iinp", "ioutp"):
        frames, motion = 1, 0
    trans_nums = {"i2v": [1], "vexd": [8], "itrans": [1, 1], "vtrans": [8, 8]}.get(task, [])
    if task in ("icolor", "vcolor"):
        added, negative, guidance = "natural, vibrant", "over-saturated, grayscale, b&w, color bleeding, plain", 7
    elif task in ("isr", "vsr"):
        added = "clean, extremely detailed, high-resolution, 4k"
        negative = "blurry, dotted, noise, jpeg compression, raster lines, unclear, lowres, over-smoothed"
    text = prompt + " " + added + " " + f"#task: {TASK_MAP[task]}"
    video = official(text, negative, height=height, width=width, num_frames=frames, input_path=input_path,
                     mask_path=mask_path, noise_aug_strength=0.0, motion_score=motion, num_inference_steps=steps,
                     guidance_scale=guidance, upscale=4, crop_type="keep_ratio", task=task, trans_nums=trans_nums,
                     use_t_schedule=False, generator=torch.Generator("cpu").manual_seed(seed),
                     default_num_frames=frames).frames
    if video.shape[2] % 4 == 0:
        video = video[:, :, 3:]
    return video[0].float().clamp(-1, 1)
