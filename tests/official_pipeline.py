"""The official MfM pipeline (github leeruibin/MfM, ``MfMPipeline``) on tiny random components,
called as the official ``infer_mfm_pipeline.py`` calls it, for parity tests.

The checkout comes from MFM_OFFICIAL_REPO (tests skip without it); ``tools/official_pipeline.py``
imports and builds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.random_pipeline import save_scheduler
from megatron_mfm.utils.media import write_mp4

OFFICIAL_REPO = os.environ.get("MFM_OFFICIAL_REPO", "")


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
    save_scheduler(root / "scheduler")
    return {"pipeline": str(root), "depth": paths["depth_path"]}


def _video(path: Path, frames: int, seed: int, width: int = 48, height: int = 32) -> str:
    write_mp4(path, torch.rand(3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    return str(path)


def _image(path: Path, width: int, height: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy(), "RGB").save(path)
    return str(path)


def write_media(folder: Path) -> dict[str, str]:
    """Input files of every task: a landscape and a portrait image, two short videos of other
    sizes, a mask image (white: known) and a mask video."""
    folder.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((24, 40), np.uint8)
    mask[4:20, 6:30] = 255  # white: known
    Image.fromarray(mask).save(folder / "known.png")
    return {
        "landscape": _image(folder / "landscape.png", 40, 24, 1), "portrait": _image(folder / "portrait.png", 24, 40, 2),
        "a": _video(folder / "a.mp4", 11, 3), "b": _video(folder / "b.mp4", 10, 4), "mask": str(folder / "known.png"),
        "mask_video": _video(folder / "mask.mp4", 11, 5),
    }


def task_inputs(task: str, files: dict[str, str]) -> tuple[list[str], str | None, str | None]:
    """(our sample.py flags, the official input_path, mask_path) of a task on ``write_media``'s files."""
    inputs = {
        "i2v": (["--image", files["portrait"]], files["portrait"], None),
        "itrans": (["--image", files["landscape"], "--image", files["portrait"]],
                   f"{files['landscape']};{files['portrait']}", None),
        "isr": (["--image", files["landscape"]], files["landscape"], None),
        "icolor": (["--image", files["landscape"]], files["landscape"], None),
        "iinp": (["--image", files["landscape"], "--mask", files["mask"]], files["landscape"], files["mask"]),
        "ioutp": (["--image", files["portrait"]], files["portrait"], None),
        "vexd": (["--video", files["a"]], files["a"], None),
        "vtrans": (["--video", files["a"], "--video", files["b"]], f"{files['a']};{files['b']}", None),
        "vinp": (["--video", files["a"], "--mask", files["mask_video"]], files["a"], files["mask_video"]),
    }
    if task in ("vsr", "vcolor", "voutp", "vedit"):
        return ["--video", files["b"]], files["b"], None
    return inputs.get(task, ([], None, None))


def sample_ours(argv: list[str], seed: int) -> torch.Tensor:
    """The clip (3, F, H, W) tools/sample.py renders for ``argv``'s one task, its noise drawn
    from a generator seeded ``seed`` on the model's device (as sample.py's main draws it)."""
    from tools import sample as sample_tool

    args = sample_tool.parse_args(argv)
    sampler = sample_tool.load_sampler(args)
    request = sample_tool.requests_of(args)[0]
    return sample_tool.render(sampler, sample_tool.prepared_sample(request, args), args,
                              torch.Generator(sampler.device).manual_seed(seed))


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
                     use_t_schedule=False, generator=torch.Generator(official.transformer.device).manual_seed(seed),
                     default_num_frames=frames).frames
    if video.shape[2] % 4 == 0:
        video = video[:, :, 3:]
    return video[0].float().clamp(-1, 1)
