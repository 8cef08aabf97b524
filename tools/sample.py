#!/usr/bin/env python3
"""Sample MfM tasks from a megatron_mfm checkpoint or an official (exported) folder.

Videos are written as mp4, images (t2i, isr, icolor, iinp, ioutp) as PNG, plus a PNG contact
sheet (per sample: a condition row and a sample row). Conditions come from files (--image,
--video, --mask, or per line of --prompt-file); a task given no file uses a clip of the built-in
synthetic data (--synthetic-index), as training does. Defaults follow the official inference
script: 30 Euler steps, guidance 9, its negative prompt, 97 frames at 352x640.

  python tools/sample.py --load ckpt --tasks t2v --prompt "a cat surfing" --output samples/
  python tools/sample.py --official export/ --tasks i2v --image first.png --output samples/
  python tools/sample.py --official export/ --tasks iinp --image photo.jpg --mask hole.png --output samples/
  python tools/sample.py --load ckpt --prompt-file prompts.jsonl --tasks t2v --output samples/
  torchrun --nproc-per-node 4 tools/sample.py --tp 2 --cp 2 --load ckpt --tasks t2v --output samples/

A prompt file holds one prompt per line (sampled for each of --tasks), or JSON lines such as
  {"prompt": "a red kite", "task": "vinp", "video": "clip.mp4", "mask": "hole.png", "seed": 3}
with paths relative to the prompt file. Masks: white = region to generate (--mask-white keep
reads the official benchmark masks, where white = known).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm


from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

from megatron_mfm.encoders.interface import EncoderConfig, build_encoders
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
from megatron_mfm.diffusion.generation import (
    OFFICIAL_NEGATIVE_PROMPT,
    SamplingConfig,
    generate,
    task_sample_for,
)
from megatron_mfm.tasks.user_inputs import (
    IMAGE_INPUTS,
    MASK_TASKS,
    VIDEO_INPUTS,
    TaskInputs,
    read_prompt_file,
    task_sample_from_inputs,
)
from megatron_mfm.checkpoint.model_state import build_from_checkpoint, build_from_official
from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel
from megatron_mfm.tasks.builders import IMAGE_TASKS, TASKS, TaskSample
from megatron_mfm.utils.media import contact_sheet, to_uint8_frames, write_mp4, write_png


def requests_of(args: argparse.Namespace) -> list[TaskInputs]:
    """One request per task of --tasks, or the lines of --prompt-file."""
    if args.prompt_file:
        return read_prompt_file(args.prompt_file, args.tasks, args.mask_white, args.seed)
    for flag, files, takers in (("--image", args.image, IMAGE_INPUTS), ("--video", args.video, VIDEO_INPUTS),
                                ("--mask", [args.mask] if args.mask else [], MASK_TASKS)):
        if files and not set(args.tasks) & set(takers):
            raise ValueError(f"{flag} {' '.join(files)}: none of --tasks {' '.join(args.tasks)} takes it "
                             f"(tasks that do: {', '.join(takers)})")
    return [TaskInputs.shared(task, args.image, args.video, args.mask, prompt=args.prompt,
                              mask_white=args.mask_white, seed=args.seed) for task in args.tasks]


def task_sample(request: TaskInputs, args: argparse.Namespace) -> TaskSample:
    """The request's condition from its files, or from a synthetic clip when it has none."""
    if request.has_media:
        return task_sample_from_inputs(request, args.frames, args.height, args.width, args.fps)
    data = SyntheticVideoDataset(SyntheticConfig(frames=args.frames, height=args.height, width=args.width, fps=args.fps))
    clip = data.clip(args.synthetic_index, is_image=request.task in IMAGE_TASKS)
    if request.prompt:
        clip.caption = request.prompt
    return task_sample_for(clip, request.task, request.seed)


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` to a hidden sibling with the same suffix, then rename: no half-written sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_sample(out: Path, name: str, clip: torch.Tensor, fps: float) -> Path:
    """mp4 for a video, PNG for an image (one frame)."""
    if clip.shape[1] == 1:
        return write_atomically(out / f"{name}.png", lambda p: write_png(p, to_uint8_frames(clip)[0]))
    return write_atomically(out / f"{name}.mp4", lambda p: write_mp4(p, clip, fps))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="checkpoint (training or converted) or a save directory")
    source.add_argument("--official", help="official (exported) transformer/ or pipeline folder")
    parser.add_argument("--tasks", nargs="+", default=["t2v"], choices=TASKS, help="tasks to sample")
    parser.add_argument("--output", required=True, help="folder for mp4 and PNG files")
    parser.add_argument("--weights", default="ema", choices=["raw", "ema"], help="EMA (training checkpoints) or raw")
    parser.add_argument("--prompt", default="", help="caption (default: the synthetic reference clip's caption)")
    parser.add_argument("--prompt-file", help="one prompt per line, or JSON lines with prompt/task/image/video/mask/seed")
    parser.add_argument("--image", action="append", default=[],
                        help="image file (png/jpg) for i2v, isr, icolor, iinp, ioutp; give it twice for itrans")
    parser.add_argument("--video", action="append", default=[],
                        help="video file (mp4) for vexd, vsr, vcolor, vinp, voutp, vedit; give it twice for vtrans")
    parser.add_argument("--mask", help="mask image (png) for iinp, ioutp, vinp, voutp")
    parser.add_argument("--mask-white", default="generate", choices=["generate", "keep"],
                        help="what the mask's white pixels are: the region to generate, or the known region")
    parser.add_argument("--negative-prompt", default=OFFICIAL_NEGATIVE_PROMPT, help="prompt of the unguided branch")
    parser.add_argument("--synthetic-index", type=int, default=10**6, help="synthetic clip for tasks given no file")
    parser.add_argument("--frames", type=int, default=97, help="pixel frames (4k+1) of video tasks")
    parser.add_argument("--height", type=int, default=352, help="pixel height (a multiple of 16)")
    parser.add_argument("--width", type=int, default=640, help="pixel width (a multiple of 16)")
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=SamplingConfig.steps, help="Euler steps")
    parser.add_argument("--guidance-scale", type=float, default=SamplingConfig.guidance_scale)
    parser.add_argument("--schedule", default="official", choices=["official", "shifted"],
                        help="official: the MfM time warp; shifted: linear sigmas with --shift")
    parser.add_argument("--shift", type=float, default=3.0, help="shift of the shifted schedule")
    parser.add_argument("--seed", type=int, default=0, help="noise (and random mask) seed; a prompt-file line may set its own")
    parser.add_argument("--encoders", default="",
                        help="pipeline folder whose vae/, text_encoder/, tokenizer/ are loaded (default: built-in stand-ins)")
    parser.add_argument("--depth-path", default="", help="Depth-Anything-V2 folder: depth for i2v/itrans/vexd/vtrans")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (torchrun --nproc-per-node tp*cp)")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size: tokens split over cp ranks")
    args = parser.parse_args(argv)
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        parser.error(f"--frames {args.frames} must be 4k+1 and --height/--width {args.height}x{args.width} multiples of 16")
    return args


CONTACT_SHEET_SAMPLES = 16


def encoder_config(args: argparse.Namespace) -> EncoderConfig:
    """Built-in stand-ins, or the pretrained encoders of a pipeline folder (local files only)."""
    if not args.encoders:
        if args.depth_path:
            raise SystemExit("sample.py: --depth-path needs --encoders (the pretrained VAE and text encoder)")
        return EncoderConfig()
    folder = Path(args.encoders)
    try:
        return EncoderConfig(kind="pretrained", vae_path=str(folder / "vae"), text_encoder_path=str(folder / "text_encoder"),
                             tokenizer_path=str(folder / "tokenizer"), depth_path=args.depth_path)
    except ValueError as error:
        raise SystemExit(f"sample.py: --encoders {folder}: {error}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        requests = requests_of(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"sample.py: {error}") from None
    encoders_wanted = encoder_config(args)  # a bad folder fails before any process group exists
    initialize_parallel(tensor_parallel_size=args.tp, context_parallel_size=args.cp)
    writer = torch.distributed.get_rank() == 0  # every rank samples (TP/CP), one writes
    layout = dict(tensor_model_parallel_size=args.tp, context_parallel_size=args.cp)
    try:
        if args.official:
            model = build_from_official(args.official, backend="auto", **layout)
        else:
            model = build_from_checkpoint(args.load, args.weights, backend="auto", **layout)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model.to(device).eval()
        encoders = build_encoders(encoders_wanted, model.config.text_hidden_size, device)
        out = Path(args.output)
        rows = []
        for number, request in enumerate(tqdm(requests, desc="samples", unit="sample", disable=not writer)):
            sampling = SamplingConfig(steps=args.steps, guidance_scale=args.guidance_scale, schedule=args.schedule,
                                      shift=args.shift, negative_prompt=args.negative_prompt, seed=request.seed)
            try:
                sample = task_sample(request, args)
            except (ValueError, FileNotFoundError) as error:
                raise SystemExit(f"sample.py: {error}") from None
            clip = generate(model, encoders, sample, sampling)
            if writer and len(rows) < 2 * CONTACT_SHEET_SAMPLES:  # memory stays bounded over a long prompt file
                rows += [sample.condition[:3], clip]
            if writer:
                name = f"{number:04d}_{request.task}" if args.prompt_file else request.task
                tqdm.write(f"{write_sample(out, name, clip, args.fps)}  prompt: {sample.prompt!r}")
        if writer:
            sheet = write_atomically(out / "contact_sheet.png", lambda p: write_png(p, contact_sheet(rows)))
            print(f"contact sheet (up to {CONTACT_SHEET_SAMPLES} samples: condition row, sample row): {sheet}")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
