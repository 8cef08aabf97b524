#!/usr/bin/env python3
"""Sample MfM tasks from a megatron_mfm checkpoint: mp4 per task plus a PNG contact sheet.

The condition of each task is built from a reference clip, exactly as in training: a video or
image file (--input) or a clip of the built-in synthetic data (--synthetic-index).

  python tools/sample.py --load ckpt --tasks t2v i2v --output samples/ --weights ema
  python tools/sample.py --official export/transformer --tasks vinp --input clip.mp4 --output samples/
  torchrun --nproc-per-node 2 tools/sample.py --tp 2 --load ckpt --tasks t2v --output samples/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mfm.utils.warnings_filter import quiet_known_warnings  # noqa: E402

quiet_known_warnings()

from megatron_mfm.data.encoders import builtin_encoders  # noqa: E402
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset  # noqa: E402
from megatron_mfm.diffusion.pipeline import SamplingConfig, generate, task_sample_for  # noqa: E402
from megatron_mfm.export.model_checkpoint import build_from_checkpoint, build_from_official  # noqa: E402
from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel  # noqa: E402
from megatron_mfm.tasks.builders import IMAGE_TASKS, TASKS, Clip  # noqa: E402
from megatron_mfm.utils.media import contact_sheet, read_video, write_mp4, write_png  # noqa: E402


def reference_clip(args: argparse.Namespace, image: bool) -> Clip:
    """The clip the task condition is built from."""
    if args.input:
        frames = torch.from_numpy(read_video(args.input)).float() / 127.5 - 1  # (F, H, W, 3)
        pixels = frames.permute(3, 0, 1, 2)[:, : 1 if image else args.frames]
        pixels = torch.nn.functional.interpolate(pixels, size=(args.height, args.width), mode="bilinear")
        if not image and pixels.shape[1] < args.frames:
            raise SystemExit(f"{args.input}: {pixels.shape[1]} frames, --frames asks for {args.frames}")
        return Clip(pixels=pixels, caption=args.prompt or "", fps=args.fps, key=str(args.input))
    data = SyntheticVideoDataset(SyntheticConfig(frames=args.frames, height=args.height, width=args.width, fps=args.fps))
    clip = data.clip(args.synthetic_index, is_image=image)
    if args.prompt:
        clip.caption = args.prompt
    return clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="checkpoint (training or converted) or a save directory")
    source.add_argument("--official", help="official (exported) transformer/ or pipeline folder")
    parser.add_argument("--tasks", nargs="+", default=["t2v", "i2v"], choices=TASKS, help="tasks to sample")
    parser.add_argument("--output", required=True, help="folder for mp4 and PNG files")
    parser.add_argument("--weights", default="ema", choices=["raw", "ema"], help="EMA (training checkpoints) or raw")
    parser.add_argument("--prompt", default="", help="caption (default: the reference clip's caption)")
    parser.add_argument("--input", help="video or image file to build conditions from")
    parser.add_argument("--synthetic-index", type=int, default=10**6, help="synthetic reference clip (no --input)")
    parser.add_argument("--frames", type=int, default=9, help="pixel frames (4k+1)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=30, help="Euler steps")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--schedule", default="official", choices=["official", "shifted"],
                        help="official: the MfM time warp; shifted: linear sigmas with --shift")
    parser.add_argument("--shift", type=float, default=3.0, help="shift of the shifted schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (torchrun --nproc-per-node N)")
    args = parser.parse_args()

    initialize_parallel(tensor_parallel_size=args.tp)
    writer = torch.distributed.get_rank() == 0  # every rank samples (TP), one writes
    layout = dict(tensor_model_parallel_size=args.tp)
    try:
        if args.official:
            model = build_from_official(args.official, backend="auto", **layout)
        else:
            model = build_from_checkpoint(args.load, args.weights, backend="auto", **layout)
        config = model.config
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model.to(device).eval()
        encoders = builtin_encoders(config.text_hidden_size)
        sampling = SamplingConfig(steps=args.steps, guidance_scale=args.guidance_scale, schedule=args.schedule,
                                  shift=args.shift, seed=args.seed)
        out = Path(args.output)
        references, clips = [], []
        for task in args.tasks:
            reference = reference_clip(args, image=task in IMAGE_TASKS)
            sample = task_sample_for(reference, task, args.seed)
            clip = generate(model, encoders, sample, sampling)
            references.append(sample.condition[:3])
            clips.append(clip)
            if writer:
                path = write_mp4(out / f"{task}.mp4", clip, args.fps)
                print(f"{task}: {path}  prompt: {sample.prompt!r}")
        if writer:
            sheet = write_png(out / "contact_sheet.png", contact_sheet([c for pair in zip(references, clips) for c in pair]))
            print(f"contact sheet (per task: condition row, sample row): {sheet}")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
