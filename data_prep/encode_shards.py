#!/usr/bin/env python3
"""Precompute VAE latents and T5 text embeddings of shards written by make_shards.py.

For every sample KEY of ``--shards/shard-XXXXXX.tar`` the sidecar shard of the same name in
``--output`` holds
  KEY.latents.npy  (16, (F-1)/4+1, H/8, W/8) scaled VAE latents of the clip decoded at
                   --frames/--height/--width/--fps (images: one frame), as training consumes them;
  KEY.text.npz     states (N, 77, D), mask (N, 77), tasks (N,), prompts (N,): T5 embeddings of the
                   tagged prompt of each task the sample can take (image or video tasks, or --tasks).
Weights load from local folders only. Shards are split round-robin over ranks (torchrun's
RANK/WORLD_SIZE/LOCAL_RANK, or --rank/--world-size); each sidecar is written under a temporary
name and renamed, so a re-run skips finished ones. A sample that cannot be decoded is skipped and
listed in the shard's report, never fatal. Each rank writes summary-rankNNNNN.json. Training
reads the sidecars with ``data.shards.precomputed=OUTPUT`` (``megatron_mfm/data/precomputed.py``).

  torchrun --nproc-per-node 8 data_prep/encode_shards.py --shards shards/ --output latents/ \\
      --vae-path mfm/vae --text-encoder-path mfm/text_encoder --tokenizer-path mfm/tokenizer \\
      --frames 97 --height 352 --width 640 --fps 16
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


from megatron_mfm.data.decode.pyav import MediaError
from megatron_mfm.encoders.interface import DTYPES, EncoderConfig, FrozenEncoders, build_encoders
from megatron_mfm.data.shards.precomputed import SETTINGS
from megatron_mfm.data.shards.reader import clip_from_sample, iter_shard
from megatron_mfm.tasks.builders import IMAGE_TASKS, TASKS, VIDEO_TASKS, Clip, task_prompt
from megatron_mfm.utils.atomic import atomic_write_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, type=Path, help="folder of shard-XXXXXX.tar from make_shards.py")
    parser.add_argument("--output", required=True, type=Path, help="folder for the sidecar shards and reports")
    parser.add_argument("--vae-path", required=True, help="local AutoencoderKLCogVideoX folder")
    parser.add_argument("--text-encoder-path", required=True, help="local T5EncoderModel folder")
    parser.add_argument("--tokenizer-path", required=True, help="local T5 tokenizer folder")
    parser.add_argument("--frames", type=int, default=97, help="video frames (4k+1)")
    parser.add_argument("--height", type=int, default=352, help="frame height (multiple of 8)")
    parser.add_argument("--width", type=int, default=640, help="frame width (multiple of 8)")
    parser.add_argument("--fps", type=float, default=None, help="resample videos to this rate (default: as stored)")
    parser.add_argument("--tasks", default="", help="comma-separated tasks to embed prompts for (default: all that fit)")
    parser.add_argument("--posterior", choices=("sample", "mode"), default="sample",
                        help="VAE posterior sample (official MfM; seeded by the sample key) or its mode")
    parser.add_argument("--store-dtype", choices=("float16", "float32"), default="float16", help="stored arrays")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="encoder weights: auto is bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--vae-tiling", action="store_true", help="tiled VAE encoding (less memory)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when a GPU is present, else cpu")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    parser.add_argument("--world-size", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
    args = parser.parse_args(argv)
    if args.frames < 1 or (args.frames - 1) % 4:
        parser.error(f"--frames {args.frames}: the VAE needs 4k+1 frames")
    if args.height % 8 or args.width % 8 or args.height < 8 or args.width < 8:
        parser.error(f"--height {args.height} --width {args.width}: sides must be positive multiples of 8")
    args.rank = int(os.environ.get("RANK", 0)) if args.rank is None else args.rank
    args.world_size = int(os.environ.get("WORLD_SIZE", 1)) if args.world_size is None else args.world_size
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank {args.rank} --world-size {args.world_size}: need 0 <= rank < world size")
    unknown = [t for t in args.tasks.split(",") if t and t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; tasks are {list(TASKS)}")
    if not args.shards.is_dir() or not sorted(args.shards.glob("shard-*.tar")):
        parser.error(f"--shards {args.shards}: no shard-*.tar files there")
    if args.output.resolve() == args.shards.resolve():
        parser.error("--output must differ from --shards (sidecars keep the shard names)")
    return args


def check_settings(output: Path, settings: dict) -> None:
    """A re-run must encode the same way as the sidecars it keeps."""
    path = output / SETTINGS
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if changed:
            raise SystemExit(f"{path}: these sidecars were made with other settings ({', '.join(changed)}); "
                             "use a new --output or the same settings")
    else:
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def tasks_for(clip: Clip, requested: list[str]) -> list[str]:
    fitting = IMAGE_TASKS if clip.is_image else VIDEO_TASKS
    return [t for t in fitting if not requested or t in requested]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def encode_sample(encoders: FrozenEncoders, clip: Clip, tasks: list[str], device: torch.device,
                  store: np.dtype) -> dict[str, bytes]:
    """The sidecar members of one clip."""
    torch.manual_seed(zlib.crc32(clip.key.encode()))  # a posterior sample that a re-run repeats
    latents = encoders.encode_video(clip.pixels[None].to(device))[0]
    prompts = [task_prompt(clip.caption, task, clip.fps) for task in tasks]
    states, mask = encoders.encode_text(prompts, device)
    return {
        f"{clip.key}.latents.npy": npy_bytes(latents.cpu().numpy().astype(store)),
        f"{clip.key}.text.npz": npz_bytes(states=states.cpu().numpy().astype(store), mask=mask.cpu().numpy().astype(bool),
                                          tasks=np.array(tasks), prompts=np.array(prompts)),
    }


def encode_shard(shard: Path, target: Path, encoders: FrozenEncoders, args: argparse.Namespace,
                 device: torch.device) -> dict:
    """Write ``target`` (temp name, then rename) and its report; returns the report."""
    report = {"shard": shard.name, "samples": 0, "encoded": 0, "corrupt": []}
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    requested = [t for t in args.tasks.split(",") if t]
    try:
        with tarfile.open(tmp, "w") as tar:
            for key, name, media, record in tqdm(iter_shard(shard), desc=shard.name, unit="sample", leave=False):
                report["samples"] += 1
                try:
                    clip = clip_from_sample(key, name, media, record, args.frames, args.height, args.width, args.fps)
                except (MediaError, OSError, ValueError, KeyError) as error:
                    report["corrupt"].append({"key": key, "member": name, "reason": str(error)})
                    continue
                for member, payload in encode_sample(encoders, clip, tasks_for(clip, requested), device,
                                                     np.dtype(args.store_dtype)).items():
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
                report["encoded"] += 1
        atomic_write_text(report_path(target), json.dumps(report, indent=2) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def report_path(sidecar: Path) -> Path:
    return sidecar.with_name(sidecar.name.removesuffix(".tar") + ".report.json")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shards = sorted(args.shards.glob("shard-*.tar"))[args.rank::args.world_size]
    args.output.mkdir(parents=True, exist_ok=True)
    check_settings(args.output, {k: getattr(args, k) for k in ("frames", "height", "width", "fps", "tasks", "posterior",
                                                               "store_dtype", "vae_path", "text_encoder_path")})
    todo = [s for s in shards if not (args.output / s.name).exists()]
    failed = []
    if todo:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
        config = EncoderConfig(kind="pretrained", vae_path=args.vae_path, text_encoder_path=args.text_encoder_path,
                               tokenizer_path=args.tokenizer_path, dtype=args.dtype, vae_tiling=args.vae_tiling,
                               sample_posterior=args.posterior == "sample")
        encoders = build_encoders(config, None, device)
        for shard in tqdm(todo, desc=f"rank {args.rank} encoding shards", unit="shard"):
            try:
                encode_shard(shard, args.output / shard.name, encoders, args, device)
            except (tarfile.TarError, OSError, ValueError) as error:
                # an unreadable tar or JSON record: reported; the next run retries the shard
                failed.append({"shard": shard.name, "reason": f"{type(error).__name__}: {error}"})
    reports = [json.loads(report_path(args.output / s.name).read_text()) for s in shards
               if report_path(args.output / s.name).exists() and (args.output / s.name).exists()]
    summary = {
        "rank": args.rank, "world_size": args.world_size, "shards": len(shards),
        "written_now": len(todo) - len(failed), "skipped_finished": len(shards) - len(todo), "failed_shards": failed,
        "samples": sum(r["samples"] for r in reports), "encoded": sum(r["encoded"] for r in reports),
        "corrupt": [{"shard": r["shard"], **c} for r in reports for c in r["corrupt"]],
    }
    atomic_write_text(args.output / f"summary-rank{args.rank:05d}.json", json.dumps(summary, indent=2) + "\n")
    print(f"rank {args.rank}: {summary['encoded']} samples encoded in {len(shards)} shards "
          f"({summary['written_now']} written now, {summary['skipped_finished']} already done), "
          f"{len(summary['corrupt'])} corrupt, {len(failed)} unreadable shards")
    return summary


if __name__ == "__main__":
    main()
