#!/usr/bin/env python3
"""Decode throughput of the loader's backends (PyAV, DALI) and its wait share of a training step.

For each backend and worker count, over the same files:
- clips/s and frames/s: decode ``--clips`` clips in batches of ``--batch-size`` as fast as possible;
- wait share: ``--steps`` simulated training steps (``--step-ms`` of sleep per batch) while the
  loader prefetches; wait share = time spent waiting for the next batch / total time.

Workers: for PyAV, DataLoader worker processes (0 = decode in the main process); for DALI, the
decoder runs in the main process, where its GPU output lands, with ``workers`` DALI threads and a
prefetch thread (0 = one thread, no prefetch). Throughput is steady state: the first 2 x workers
batches (worker start, pipeline builds, prefetch queues) are left out and at least 2 x workers
batches are timed. The wait share leaves out only the first batch: training then starts stepping
while the workers fill their queues, as a real run does.

Inputs: ``--input`` a shard folder from data_prep/make_shards.py or a folder of videos, or
``--synthetic N``: N clips written with PyAV (H.264 or VP9) into ``--synthetic-dir``, so the
benchmark runs on a bare machine.

  # DALI (NVDEC) vs PyAV on the same H.264 720p files, and the wait share of a 2.5 s step (~5 min)
  python benchmarks/dataloader.py --synthetic 16 --codec h264 --synthetic-size 1280x720 \
      --synthetic-dir /tmp/bench_media --backends pyav dali --dali-device gpu --workers 0 8 16 \
      --frames 49 --height 480 --width 832 --fps 16 --batch-size 4 --clips 48 --step-ms 2500 --steps 6 \
      --output runs/bench_dataloader.json
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm


from megatron_mfm.data.decode.dali import (
    ClipRequest, DaliDecodeConfig, DaliDecoder, decode_backend)
from megatron_mfm.data.decode.pyav import VIDEO_SUFFIXES, MediaError
from megatron_mfm.utils.atomic import atomic_write_text
from megatron_mfm.utils.media import write_mp4

ENCODERS = {"h264": "libx264", "vp9": "libvpx-vp9"}
PREFETCH = 2
"""Batches decoded ahead: per DataLoader worker (PyAV), or by the prefetch thread (DALI)."""


@dataclass(frozen=True)
class MediaRef:
    """Where one video's bytes are: a whole file, or a member of a shard tar."""

    path: str
    offset: int
    size: int
    name: str

    def read(self) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


def file_refs(paths: Iterable[Path]) -> list[MediaRef]:
    return [MediaRef(str(path), 0, path.stat().st_size, path.name) for path in paths]


def find_media(folder: Path) -> list[MediaRef]:
    """The videos of a shard folder (members of shard-*.tar) or of a plain folder."""
    refs = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            refs += [MediaRef(str(shard), m.offset_data, m.size, m.name) for m in tar
                     if Path(m.name).suffix.lower() in VIDEO_SUFFIXES]
    if not refs:
        refs = file_refs(p for p in sorted(folder.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES)
    if not refs:
        raise SystemExit(f"--input {folder}: no videos (no shard-*.tar members or files ending in "
                         f"{', '.join(sorted(VIDEO_SUFFIXES))})")
    return refs


def synthetic_pixels(seed: int, frames: int, height: int, width: int) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1]: a smooth random texture (detail every 8 pixels) panning diagonally,
    so the encoder sees motion and detail at a web-video bitrate (H.264 720p: a few Mbit/s), which
    pure noise would inflate and flat colour deflate."""
    generator = torch.Generator().manual_seed(seed)
    pan = 3 * frames
    coarse = torch.rand(1, 3, (height + pan) // 8 + 2, (width + pan) // 8 + 2, generator=generator) * 2 - 1
    texture = F.interpolate(coarse, size=(height + pan, width + pan), mode="bicubic", align_corners=False)[0]
    return torch.stack([texture[:, 3 * f:3 * f + height, 3 * f:3 * f + width] for f in range(frames)], 1).clamp(-1, 1)


def make_synthetic(folder: Path, count: int, frames: int, height: int, width: int, fps: float,
                   codec: str) -> list[Path]:
    """``count`` clips in ``folder``, kept from an earlier run with the same settings. One at a
    time: the encoders use their own threads, and forking beside DALI's threads could deadlock."""
    paths = [folder / f"synthetic-{codec}-{width}x{height}-{frames}f-{fps:g}fps-{seed:04d}.mp4"
             for seed in range(count)]
    for seed, path in enumerate(tqdm(paths, desc="writing synthetic clips", unit="clip")):
        if not path.exists():  # written under a temporary name: an interrupted run leaves no half clip
            partial = write_mp4(path.with_name(f".partial-{path.name}"), synthetic_pixels(seed, frames, height, width),
                                fps=fps, codec=ENCODERS[codec])
            os.replace(partial, path)
    return paths


class ClipBatches(torch.utils.data.Dataset):
    """Batch ``i`` = clips ``i*B .. i*B+B-1`` of the files (cycled), decoded: (decoded clips, errors)."""

    def __init__(self, refs: list[MediaRef], batches: int, batch_size: int, frames: int, height: int, width: int,
                 fps: float | None, decode: Callable):
        self.refs, self.batches, self.batch_size = refs, batches, batch_size
        self.shape = (frames, height, width, fps)
        self.decode = decode

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        refs = [self.refs[(index * self.batch_size + k) % len(self.refs)] for k in range(self.batch_size)]
        requests = [ClipRequest(ref.read(), ref.name, *self.shape) for ref in refs]
        if isinstance(self.decode, DaliDecoder):
            results = self.decode.decode_batch(requests)
        else:
            results = []
            for request in requests:
                try:
                    results.append(self.decode(request.data, request.name, *self.shape))
                except MediaError as error:
                    results.append(error)
        clips = [r for r in results if isinstance(r, torch.Tensor)]
        return clips, len(results) - len(clips)


def prefetch_in_thread(dataset: ClipBatches, depth: int) -> Iterator:
    """Batches in order, ``depth`` of them decoded ahead by one background thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(dataset.__getitem__, i) for i in range(min(depth, len(dataset))))
        for index in range(len(dataset)):
            batch = pending.popleft().result() if pending else dataset[index]
            if index + depth < len(dataset):
                pending.append(pool.submit(dataset.__getitem__, index + depth))
            yield batch


def batches(backend: str, workers: int, dataset: ClipBatches) -> Iterator:
    if backend == "dali":
        return prefetch_in_thread(dataset, depth=PREFETCH if workers else 0)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, prefetch_factor=PREFETCH if workers else None,
        multiprocessing_context="spawn" if workers else None, persistent_workers=False))


def wait_for(iterator: Iterator) -> tuple[list[torch.Tensor], int, float]:
    """(clips, errors, seconds waited) of the next batch, its decoding finished."""
    start = time.perf_counter()
    clips, errors = next(iterator)
    if clips and clips[0].is_cuda:
        torch.cuda.synchronize(clips[0].device)
    return clips, errors, time.perf_counter() - start


def measure(backend: str, workers: int, dataset: ClipBatches, warmup: int, step_s: float, label: str) -> dict:
    """Take ``warmup`` batches untimed, then the rest of ``dataset``, each after a ``step_s`` sleep
    (the training step on the previous batch, while the loader prefetches)."""
    iterator = batches(backend, workers, dataset)
    for _ in range(warmup):
        wait_for(iterator)
    clips = errors = 0
    waited = 0.0
    start = time.perf_counter()
    for _ in tqdm(range(len(dataset) - warmup), desc=label, unit="batch", leave=False):
        time.sleep(step_s)
        batch, failed, seconds = wait_for(iterator)
        clips, errors, waited = clips + len(batch), errors + failed, waited + seconds
    elapsed = time.perf_counter() - start
    return {"clips": clips, "errors": errors, "seconds": elapsed, "waited": waited}


def bench(args: argparse.Namespace, refs: list[MediaRef]) -> list[dict]:
    rows = []
    shape = (args.batch_size, args.frames, args.height, args.width, args.fps)
    for backend in args.backends:
        for workers in args.workers:
            if backend == "dali":
                decode = DaliDecoder(DaliDecodeConfig(device=args.dali_device, max_batch_size=args.batch_size,
                                                      num_threads=max(1, workers)))
            else:
                decode = decode_backend(backend, flag="--backends")
            label = f"{backend} workers={workers}"
            # steady state: the prefetch queues filled and drained first, then two batches per worker at least
            warmup, measured = PREFETCH * workers or 1, max(-(-args.clips // args.batch_size), PREFETCH * workers)
            speed = measure(backend, workers, ClipBatches(refs, warmup + measured, *shape, decode), warmup, 0.0,
                            f"{label} throughput")
            row = {"backend": backend, "device": args.dali_device if backend == "dali" else "cpu", "workers": workers,
                   "clips": speed["clips"], "errors": speed["errors"], "seconds": round(speed["seconds"], 3),
                   "clips_per_s": round(speed["clips"] / speed["seconds"], 2),
                   "frames_per_s": round(speed["clips"] * args.frames / speed["seconds"], 1),
                   "step_ms": args.step_ms, "wait_share": None}
            if args.step_ms > 0:
                dataset = ClipBatches(refs, 1 + args.steps, *shape, decode)  # the first batch: start-up
                steps = measure(backend, workers, dataset, 1, args.step_ms / 1000, f"{label} {args.step_ms:g} ms steps")
                row["wait_share"] = round(steps["waited"] / steps["seconds"], 4)
            rows.append(row)
            tqdm.write(format_row(row))
    return rows


COLUMNS = ("backend", "device", "workers", "clips", "errors", "clips_per_s", "frames_per_s", "wait_share")


def format_row(row: dict) -> str:
    return "  ".join(f"{'-' if row[c] is None else row[c]!s:>12}" for c in COLUMNS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="shard folder (make_shards.py) or folder of videos")
    source.add_argument("--synthetic", type=int, metavar="N", help="write N synthetic clips and use them")
    parser.add_argument("--synthetic-dir", type=Path, default=Path("bench_media"), help="where --synthetic writes")
    parser.add_argument("--codec", choices=sorted(ENCODERS), default="h264", help="codec of --synthetic clips")
    parser.add_argument("--synthetic-size", default="1280x720", help="WIDTHxHEIGHT of --synthetic clips")
    parser.add_argument("--synthetic-frames", type=int, default=96, help="frames per --synthetic clip")
    parser.add_argument("--synthetic-fps", type=float, default=24.0, help="frame rate of --synthetic clips")
    parser.add_argument("--backends", nargs="+", choices=["pyav", "dali"], default=["pyav", "dali"])
    parser.add_argument("--dali-device", choices=["gpu", "cpu"],
                        default="gpu" if torch.cuda.is_available() else "cpu",
                        help="DALI decoder: gpu (NVDEC, H.264/HEVC) or cpu (VP8/VP9/MJPEG only)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4], help="worker counts to compare")
    parser.add_argument("--frames", type=int, default=49, help="frames per decoded clip (4k+1)")
    parser.add_argument("--height", type=int, default=480, help="decoded height (the bucket's)")
    parser.add_argument("--width", type=int, default=832, help="decoded width (the bucket's)")
    parser.add_argument("--fps", type=float, default=16.0, help="target frame rate (0: the source's)")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per batch (per training step)")
    parser.add_argument("--clips", type=int, default=64,
                        help="clips timed for the throughput figures (at least 2 batches per worker)")
    parser.add_argument("--step-ms", type=float, default=2500.0, help="simulated training step (0: skip)")
    parser.add_argument("--steps", type=int, default=8, help="simulated steps for the wait share")
    parser.add_argument("--output", type=Path, help="JSON file for the rows")
    args = parser.parse_args(argv)
    if (args.frames - 1) % 4:
        parser.error(f"--frames {args.frames}: expected 4k+1 frames")
    if args.synthetic is not None and args.synthetic < 1:
        parser.error("--synthetic N: N must be at least 1")
    if min(args.workers) < 0 or args.batch_size < 1 or args.clips < 1 or args.steps < 1:
        parser.error("--workers must be >= 0; --batch-size, --clips and --steps >= 1")
    try:
        args.synthetic_width, args.synthetic_height = (int(v) for v in args.synthetic_size.lower().split("x"))
    except ValueError:
        parser.error(f"--synthetic-size {args.synthetic_size!r}: expected WIDTHxHEIGHT, e.g. 1280x720")
    args.fps = args.fps or None
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if "dali" in args.backends:
        try:  # fail before any work, naming the flag
            decode_backend("dali", device=args.dali_device, flag="--backends")
        except ImportError as error:
            raise SystemExit(str(error)) from error
    if args.synthetic:
        refs = file_refs(make_synthetic(args.synthetic_dir, args.synthetic, args.synthetic_frames,
                                        args.synthetic_height, args.synthetic_width, args.synthetic_fps, args.codec))
    else:
        refs = find_media(args.input)
    print(f"{len(refs)} videos from {args.input or args.synthetic_dir}; "
          f"{args.frames} frames at {args.height}x{args.width}, "
          f"{args.fps or 'source'} fps, batches of {args.batch_size}")
    print("  ".join(f"{c:>12}" for c in COLUMNS))
    rows = bench(args, refs)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        record = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}
        atomic_write_text(args.output, json.dumps(record, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
