#!/usr/bin/env python3
"""Sample MfM tasks from a megatron_mfm checkpoint or an official (exported) pipeline folder.

On an official pipeline folder (transformer/, scheduler/, vae/, text_encoder/, tokenizer/) the
defaults are those of the official infer_mfm_pipeline.py and give its output: the folder's
flow-matching scheduler, 25 Euler steps, guidance 6 (7 for colourisation), each task's prompt
suffix and negative prompt, 97 frames at 352x640 (t2i, icolor 1024x1024, isr 1280x1280), inputs
kept at their aspect ratio, masks with white = known, tiled VAE decoding, mp4 at 24 fps (crf 23).
Precision: --dtype auto is the official bf16 on a GPU and float32 on the CPU.
Videos are written as mp4, images as PNG, plus a PNG contact sheet (per sample: a condition row
and a sample row). A task given no file uses a clip of the built-in synthetic data.

  python tools/sample.py --official MfM/ --tasks t2v --prompt "a cat surfing" --output samples/
  python tools/sample.py --official MfM/ --depth-path Depth-Anything-V2-Small/ --tasks i2v --image first.png --output samples/
  python tools/sample.py --official MfM/ --tasks iinp --image photo.jpg --mask known.png --output samples/
  python tools/sample.py --load ckpt --encoders MfM/ --prompt-file prompts.jsonl --tasks t2v --output samples/
  torchrun --nproc-per-node 4 tools/sample.py --tp 2 --cp 2 --load ckpt --tasks t2v --output samples/

On a CPU a full-size video takes hours: try --frames 9 --height 64 --width 96 --steps 4 first.
A prompt file holds one prompt per line (sampled for each of --tasks), or JSON lines such as
  {"prompt": "a red kite", "task": "vinp", "video": "clip.mp4", "mask": "mask.mp4", "seed": 3}
with paths relative to the prompt file. Samples without their own seed continue one noise stream
per task seeded by --seed, as the official script's generator does over its prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

from megatron_mfm.checkpoint.model_state import build_from_checkpoint, build_from_official
from megatron_mfm.config import ConfigError, load_config
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
from megatron_mfm.diffusion.generation import OFFICIAL_TASK_DEFAULTS, SamplingConfig, generate, official_prompt, task_sample_for
from megatron_mfm.diffusion.sampler import FlowMatchScheduler
from megatron_mfm.encoders.interface import DTYPES, EncoderConfig, FrozenEncoders, build_encoders
from megatron_mfm.model.attention_backends import AttentionBackendUnavailable, resolve_attention_backend
from megatron_mfm.model.presets import ATTENTION_BACKENDS
from megatron_mfm.model.specs import uses_transformer_engine
from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel
from megatron_mfm.tasks.builders import IMAGE_TASKS, TASKS
from megatron_mfm.tasks.placement import CROP_TYPES
from megatron_mfm.tasks.user_inputs import (IMAGE_INPUTS, MASK_TASKS, VIDEO_INPUTS, Geometry, PreparedSample,
                                            TaskInputs, prepare_inputs, read_prompt_file, text_only_sample)
from tools.sample_output import SampleWriter, check_output_folder

DEFAULT_SHIFT = 3.0
"""Scheduler shift when no pipeline scheduler_config.json says one (training checkpoints)."""


def requests_of(args: argparse.Namespace) -> list[TaskInputs]:
    """One request per task of --tasks, or the lines of --prompt-file."""
    if args.prompt_file:
        return read_prompt_file(args.prompt_file, args.tasks, args.mask_white)
    for flag, files, takers in (("--image", args.image, IMAGE_INPUTS), ("--video", args.video, VIDEO_INPUTS),
                                ("--mask", [args.mask] if args.mask else [], MASK_TASKS)):
        if files and not set(args.tasks) & set(takers):
            raise ValueError(f"{flag} {' '.join(files)}: none of --tasks {' '.join(args.tasks)} takes it "
                             f"(tasks that do: {', '.join(takers)})")
    return [TaskInputs.shared(task, args.image, args.video, args.mask, prompt=args.prompt,
                              mask_white=args.mask_white) for task in args.tasks]


def geometry_of(task: str, args: argparse.Namespace) -> Geometry:
    height, width = (args.height, args.width) if args.height else OFFICIAL_TASK_DEFAULTS[task].size
    return Geometry(frames=args.frames, height=height, width=width, crop_type=args.crop_type, upscale=args.upscale,
                    motion_score=args.motion_score)


def prepared_sample(request: TaskInputs, args: argparse.Namespace) -> PreparedSample:
    """The request's condition from its files, or from a synthetic clip when it has none."""
    geometry = geometry_of(request.task, args)
    synthetic = SyntheticVideoDataset(dataclasses.replace(args.reference_data, frames=geometry.frames,
                                                          height=geometry.height, width=geometry.width, fps=args.fps))
    if request.has_media or request.task in ("t2i", "t2v"):
        caption = request.prompt or synthetic.clip(args.synthetic_index, is_image=True).caption
        prompt = official_prompt(caption, request.task, args.fps)
        if not request.has_media:
            return text_only_sample(request.task, prompt, geometry)
        return prepare_inputs(request, prompt, geometry)
    clip = synthetic.clip(args.synthetic_index, is_image=request.task in IMAGE_TASKS)
    if request.prompt:
        clip.caption = request.prompt
    return PreparedSample(task_sample_for(clip, request.task, args.seed if request.seed is None else request.seed))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="training (or converted) checkpoint, or a save directory")
    source.add_argument("--official", help="official (exported) pipeline folder, or its transformer/ folder")
    parser.add_argument("--tasks", nargs="+", default=["t2v"], choices=TASKS, help="tasks to sample")
    parser.add_argument("--output", required=True, help="folder for mp4 and PNG files (new, or empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output folder that holds files")
    parser.add_argument("--weights", default="ema", choices=["raw", "ema"], help="EMA (training checkpoints) or raw")
    parser.add_argument("--prompt", default="", help="caption (default: the synthetic reference clip's caption)")
    parser.add_argument("--prompt-file", help="one prompt per line, or JSON lines with prompt/task/image/video/mask/seed")
    parser.add_argument("--image", action="append", default=[],
                        help="image file (png/jpg) for i2v, isr, icolor, iinp, ioutp; give it twice for itrans")
    parser.add_argument("--video", action="append", default=[],
                        help="video file (mp4) for vexd, vsr, vcolor, vinp, voutp, vedit; give it twice for vtrans")
    parser.add_argument("--mask", help="mask image, or mask video for vinp/voutp (iinp, ioutp, vinp, voutp)")
    parser.add_argument("--mask-white", default="keep", choices=["keep", "generate"],
                        help="what the mask's white pixels are: known (the official convention) or to generate")
    parser.add_argument("--negative-prompt", help="prompt of the unguided branch (default: the task's official one)")
    parser.add_argument("--synthetic-index", type=int, default=10**6, help="synthetic clip for tasks given no file")
    parser.add_argument("--data-config", help="a training run's YAML: the synthetic clips of tasks given no file "
                        "follow its data.synthetic scenes (shapes, backgrounds; default: the built-in mix)")
    parser.add_argument("--frames", type=int, default=97, help="frames (4k+1) of t2v and the generation tasks; "
                        "at most this many input frames for the video editing tasks")
    parser.add_argument("--height", type=int, help="canvas height, a multiple of 16 (default: the task's official one)")
    parser.add_argument("--width", type=int, help="canvas width, a multiple of 16 (default: the task's official one)")
    parser.add_argument("--crop-type", default="keep_ratio", choices=CROP_TYPES,
                        help="keep_ratio: letterbox inputs in the canvas; keep_res: generate at the input's fitted size")
    parser.add_argument("--upscale", type=int, default=4, help="isr: the output is the input's size times this")
    parser.add_argument("--motion-score", type=float, default=5.0, help="motion score of video tasks (images: 0)")
    parser.add_argument("--fps", type=float, default=16.0, help="frame rate named in the prompt's #FPS tag")
    parser.add_argument("--video-fps", type=float, default=24.0, help="frame rate of the written mp4 files")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance, off at <= 1 "
                        "(default: the task's official one, 6 or 7)")
    parser.add_argument("--schedule", default="scheduler", choices=["scheduler", "warp"],
                        help="scheduler: the folder's flow-matching scheduler (official default); "
                             "warp: the official --use_t_schedule time warp")
    parser.add_argument("--shift", type=float, help="scheduler shift (default: the folder's scheduler_config.json, "
                        f"else {DEFAULT_SHIFT})")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; a prompt-file line may set its own")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on a GPU (the official default), float32 on the CPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: the GPU if there is one")
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                        help="core attention (auto: FlashAttention-4 where it runs, else cuDNN on a GPU, SDPA on the CPU)")
    parser.add_argument("--compile-glue", action="store_true",
                        help="fuse each block's elementwise glue with torch.compile (GPU; compiles for a minute first)")
    parser.add_argument("--encoders", default="", help="pipeline folder whose vae/, text_encoder/, tokenizer/ are "
                        "loaded (default: the --official folder when it has them, else built-in stand-ins)")
    parser.add_argument("--depth-path", default="", help="Depth-Anything-V2 folder: depth for i2v/itrans/vexd/vtrans")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (torchrun --nproc-per-node tp*cp)")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size: tokens split over cp ranks")
    args = parser.parse_args(argv)
    if (args.height is None) != (args.width is None):
        parser.error("give both --height and --width, or neither")
    if (args.frames - 1) % 4 or (args.height or 0) % 16 or (args.width or 0) % 16:
        parser.error(f"--frames {args.frames} must be 4k+1 and --height/--width {args.height}x{args.width} multiples of 16")
    try:
        args.reference_data = load_config(args.data_config).data.synthetic if args.data_config else SyntheticConfig()
    except (ConfigError, FileNotFoundError) as error:
        parser.error(f"--data-config {args.data_config}: {error}")
    return args


def check_source(args: argparse.Namespace) -> None:
    """A missing checkpoint or folder, or a checkpoint flag given the other kind, in one line."""
    path = Path(args.load or args.official)
    flag = "--load" if args.load else "--official"
    if not path.exists():
        raise SystemExit(f"sample.py: {flag} {path}: no such file or folder")
    official = any((path / name).exists() for name in ("config.json", "model_index.json", "transformer"))
    if args.load and official:
        raise SystemExit(f"sample.py: --load {path} is an official (exported) folder: use --official {path}")
    if args.official and not official:
        raise SystemExit(f"sample.py: --official {path}: no config.json or transformer/ in it "
                         f"(a training checkpoint? use --load {path})")


def pipeline_folder(args: argparse.Namespace) -> Path | None:
    """The official pipeline folder the transformer comes from, if it is one."""
    if not args.official:
        return None
    path = Path(args.official)
    return path.parent if (path / "config.json").is_file() and (path.parent / "scheduler").is_dir() else path


def scheduler_shift(args: argparse.Namespace) -> float:
    """--shift, else the pipeline's scheduler_config.json (refusing options we cannot reproduce)."""
    folder = pipeline_folder(args)
    config_file = folder / "scheduler" / "scheduler_config.json" if folder else None
    if config_file is None or not config_file.is_file():
        return DEFAULT_SHIFT if args.shift is None else args.shift
    try:
        scheduler = FlowMatchScheduler.from_config(json.loads(config_file.read_text()), str(config_file))
    except (ValueError, json.JSONDecodeError) as error:
        raise SystemExit(f"sample.py: {error}") from None
    return scheduler.shift if args.shift is None else args.shift


def encoder_config(args: argparse.Namespace, dtype: torch.dtype) -> EncoderConfig:
    """Built-in stand-ins, or the pretrained encoders of a pipeline folder (local files only),
    decoding with VAE tiling as the official pipeline does."""
    folder = Path(args.encoders) if args.encoders else pipeline_folder(args)
    if folder is None or not args.encoders and not (folder / "vae").is_dir():
        if args.depth_path:
            raise SystemExit("sample.py: --depth-path needs --encoders (the pretrained VAE and text encoder)")
        return EncoderConfig()
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    try:
        return EncoderConfig(kind="pretrained", vae_path=str(folder / "vae"), text_encoder_path=str(folder / "text_encoder"),
                             tokenizer_path=str(folder / "tokenizer"), depth_path=args.depth_path, dtype=dtype_name,
                             vae_tiling=True)
    except ValueError as error:
        raise SystemExit(f"sample.py: --encoders {folder}: {error}") from None


@dataclass
class Sampler:
    """The model and encoders one run samples with."""

    model: torch.nn.Module
    encoders: FrozenEncoders
    dtype: torch.dtype
    shift: float

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def sampling_device(choice: str) -> torch.device:
    """--device: auto is the GPU when there is one."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sample.py: --device cuda: no CUDA GPU here")
    return torch.device(choice)


def load_sampler(args: argparse.Namespace) -> Sampler:
    """The model (this rank's part) and encoders, on the GPU when there is one (or --device)."""
    device = sampling_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    shift = scheduler_shift(args)
    encoders_wanted = encoder_config(args, dtype)
    try:
        attention = resolve_attention_backend(args.attention_backend, dtype != torch.float32,
                                              uses_transformer_engine("auto") and device.type == "cuda")
    except AttentionBackendUnavailable as error:
        raise SystemExit(f"sample.py: --attention-backend: {error}") from None
    layout = dict(tensor_model_parallel_size=args.tp, context_parallel_size=args.cp, compile_glue=args.compile_glue)
    layers = dict(backend="auto" if device.type == "cuda" else "local", attention_backend=attention)
    if args.official:
        model = build_from_official(args.official, **layers, **layout)
    else:
        model = build_from_checkpoint(args.load, args.weights, **layers, **layout)
    model.to(device, dtype).eval()
    return Sampler(model, build_encoders(encoders_wanted, model.config.text_hidden_size, device), dtype, shift)


def sampling_config(task: str, args: argparse.Namespace, shift: float) -> SamplingConfig:
    defaults = OFFICIAL_TASK_DEFAULTS[task]
    return SamplingConfig(
        steps=args.steps, schedule=args.schedule, shift=shift,
        guidance_scale=defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        negative_prompt=defaults.negative_prompt if args.negative_prompt is None else args.negative_prompt)


def render(sampler: Sampler, prepared: PreparedSample, args: argparse.Namespace, generator: torch.Generator,
           show_progress: bool = False) -> torch.Tensor:
    """The official output (3, F, H, W) in [-1, 1] of one prepared sample."""
    config = sampling_config(prepared.sample.task, args, sampler.shift)
    with tqdm(total=config.steps, desc=prepared.sample.task, unit="step", leave=False, disable=not show_progress) as bar:
        clip = generate(sampler.model, sampler.encoders, prepared.sample, config, sampler.dtype, generator, bar.update)
    return prepared.assemble(clip)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_source(args)
    check_output_folder(Path(args.output), args.overwrite)
    try:
        requests = requests_of(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"sample.py: {error}") from None
    initialize_parallel(tensor_parallel_size=args.tp, context_parallel_size=args.cp)
    is_writer = torch.distributed.get_rank() == 0  # every rank samples (TP/CP), one writes
    try:
        sampler = load_sampler(args)
        streams: dict[str, torch.Generator] = {}
        writer = SampleWriter(Path(args.output), bool(args.prompt_file), args.video_fps) if is_writer else None
        for request in tqdm(requests, desc="samples", unit="sample", disable=not is_writer):
            try:
                prepared = prepared_sample(request, args)
            except (ValueError, FileNotFoundError) as error:
                raise SystemExit(f"sample.py: {error}") from None
            generator = (torch.Generator(sampler.device).manual_seed(request.seed) if request.seed is not None
                         else streams.setdefault(request.task, torch.Generator(sampler.device).manual_seed(args.seed)))
            clip = render(sampler, prepared, args, generator, is_writer)
            if writer:
                writer.add(request.task, prepared.sample, clip)
        if writer:
            writer.finish()
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
