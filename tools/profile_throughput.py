#!/usr/bin/env python3
"""Training throughput of the MfM DiT: step time, tokens/s, TFLOP/s, MFU, memory, roofline.

Each configuration runs the real training step (megatron schedule, DDP, optimizer) on random
on-device inputs, so the data pipeline is excluded. FLOPs come from ``training/flops.py``, the
formula the training logs use. The roofline ratio is the measured step time over the sum of the
best times of the blocks' GEMMs and attention kernels, each timed alone (forward + backward) on
the same device; it leaves out the adapter, embeddings and optimizer, so it reads "how far the
step is from its block kernels".

Sweeps presets x resolutions x frames x recompute x precision inside one launch; the
tensor-parallel size is the launch's (torchrun --nproc-per-node N ... --tp N).

  python tools/profile_throughput.py --presets tiny --frames 9 --height 64 --width 64      # CPU
  python tools/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 \
      --precision bf16 --recompute none full --output runs/profile                          # GPU
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mfm.utils.warnings_filter import quiet_known_warnings  # noqa: E402

quiet_known_warnings()

import torch.nn.functional as F  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from megatron_mfm.config import load_config  # noqa: E402
from megatron_mfm.model.config import MfMConfig  # noqa: E402
from megatron_mfm.parallel.initialize import destroy_parallel  # noqa: E402
from megatron_mfm.training.flops import training_flops  # noqa: E402
from megatron_mfm.training.loop import H100_BF16_PEAK_TFLOPS, setup  # noqa: E402

TEXT_TOKENS = 77


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_batch(config: MfMConfig, frames: int, height: int, width: int, batch: int, device, dtype) -> dict:
    t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    return dict(
        latents=torch.randn(batch, config.in_channels, t, h, w, device=device, dtype=dtype),
        timestep=torch.rand(batch, device=device) * 1000,
        text=torch.randn(batch, TEXT_TOKENS, config.text_hidden_size, device=device, dtype=dtype),
        text_mask=torch.ones(batch, TEXT_TOKENS, device=device),
        condition=torch.randn(batch, config.condition_channels, frames, height, width, device=device, dtype=dtype),
        motion_score=torch.full((batch,), 5.0, device=device),
    )


def kernel_roofline_seconds(config: MfMConfig, tokens: int, batch: int, dtype, device, repeats: int) -> float:
    """Sum over the blocks of the best fwd+bwd time of each GEMM and attention, timed alone."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    d, ffn, ct = config.hidden_size, config.ffn_hidden_size, config.text_hidden_size
    heads, hd = config.num_attention_heads // tp, config.kv_channels
    m, mt = batch * tokens, batch * TEXT_TOKENS
    gemms = [(m, d, 3 * d // tp), (m, d // tp, d), (m, d, d // tp), (mt, ct, 2 * d // tp), (m, d // tp, d),
             (m, d, ffn // tp), (m, ffn // tp, d)]
    total = 0.0
    for rows, k, n in gemms:
        x = torch.randn(rows, k, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(k, n, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(rows, n, device=device, dtype=dtype)
        total += timed(lambda: (x @ w).backward(grad), repeats, 2)
    for kv_len in (tokens, TEXT_TOKENS):
        q = torch.randn(batch, heads, tokens, hd, device=device, dtype=dtype, requires_grad=True)
        kv = torch.randn(batch, heads, kv_len, hd, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch, heads, tokens, hd, device=device, dtype=dtype)
        total += timed(lambda: F.scaled_dot_product_attention(q, kv, kv).backward(grad), repeats, 2)
    return total * config.num_layers


def profile_one(args, preset: str, frames: int, height: int, width: int, recompute: bool, precision: str) -> dict:
    overrides = [
        f"model.preset={preset}", f"model.backend={args.backend}", f"model.recompute={recompute}",
        f"parallel.tensor_parallel={args.tp}", f"parallel.sequence_parallel={args.tp > 1}",
        f"train.precision={precision}", f"train.micro_batch_size={args.micro_batch_size}",
        f"train.global_batch_size={args.micro_batch_size * args.data_parallel}", "train.ema_decay=0",
        "checkpoint.save=", "logging.tensorboard_dir=",
    ]
    trainer = setup(load_config(overrides=overrides))
    config, ddp = trainer.model_config, trainer.ddp
    batch = random_batch(config, frames, height, width, args.micro_batch_size, trainer.device, trainer.dtype)
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)

    def forward_step(data_iterator, model):
        inputs = next(data_iterator)
        out = model(**inputs)
        return out, lambda output: (output.float().square().mean(), {})

    def step():
        ddp.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp], num_microbatches=1,
            seq_length=tokens, micro_batch_size=args.micro_batch_size, forward_only=False,
        )
        trainer.optimizer.step()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, args.iterations, args.warmup)
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    flops = training_flops(config, ((frames - 1) // 4 + 1, height // 8, width // 8), TEXT_TOKENS) * args.micro_batch_size
    tflops = flops / seconds / args.tp / 1e12
    peak = args.peak_tflops or (H100_BF16_PEAK_TFLOPS if torch.cuda.is_available() else 0.0)
    roofline = kernel_roofline_seconds(config, tokens, args.micro_batch_size, trainer.dtype, trainer.device,
                                       max(3, args.iterations))
    return {
        "preset": preset, "frames": frames, "height": height, "width": width, "tokens": tokens,
        "tp": args.tp, "recompute": "full" if recompute else "none", "precision": precision,
        "backend": args.backend, "micro_batch_size": args.micro_batch_size,
        "step_s": seconds, "tokens_per_s": tokens * args.micro_batch_size / seconds,
        "samples_per_s": args.micro_batch_size / seconds, "flops_per_step": flops,
        "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None,
        "peak_memory_gib": peak_memory, "roofline_s": roofline, "roofline_ratio": seconds / roofline,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def print_table(rows: list[dict]) -> None:
    header = ("preset", "tokens", "tp", "recompute", "precision", "step_s", "tokens_per_s", "tflops_per_gpu", "mfu",
              "peak_memory_gib", "roofline_ratio")
    print(" | ".join(f"{h:>14s}" for h in header))
    for row in rows:
        if "error" in row:
            print(f"{row['preset']:>14s} | {row['recompute']:>14s} | {row['precision']:>14s} | {row['error']}")
            continue
        cells = []
        for h in header:
            v = row[h]
            if v is None:
                cells.append(f"{'-':>14s}")
            elif h == "mfu":
                cells.append(f"{v:>14.1%}")
            elif isinstance(v, float):
                cells.append(f"{v:>14.4g}")
            else:
                cells.append(f"{v!s:>14s}")
        print(" | ".join(cells))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="model presets to sweep")
    parser.add_argument("--frames", nargs="+", type=int, default=[9], help="pixel frames (4k+1) to sweep")
    parser.add_argument("--height", nargs="+", type=int, default=[64], help="pixel heights to sweep")
    parser.add_argument("--width", nargs="+", type=int, default=[64], help="pixel widths (paired with heights)")
    parser.add_argument("--recompute", nargs="+", default=["none"], choices=["none", "full"])
    parser.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (= world size / DP)")
    parser.add_argument("--data-parallel", type=int, default=1, help="data parallel size of the launch")
    parser.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per-GPU peak for MFU (default H100 989)")
    parser.add_argument("--output", default="", help="folder for results.json and results.csv")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if len(args.height) != len(args.width):
        raise SystemExit("--height and --width take the same number of values (paired resolutions)")
    precisions = args.precision or (["bf16"] if torch.cuda.is_available() else ["fp32"])
    rows = []
    rank = 0
    try:
        for preset, frames, (height, width), recompute, precision in itertools.product(
            args.presets, args.frames, list(zip(args.height, args.width)), args.recompute, precisions
        ):
            try:
                rows.append(profile_one(args, preset, frames, height, width, recompute == "full", precision))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the previous configuration's model is gone
            except torch.OutOfMemoryError:
                rows.append({"preset": preset, "frames": frames, "height": height, "width": width,
                             "recompute": recompute, "precision": precision, "error": "out of memory"})
                torch.cuda.empty_cache()
            rank = torch.distributed.get_rank()
    finally:
        destroy_parallel()
    if rank != 0:
        return rows
    print_table(rows)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        with open(out / "results.csv", "w", newline="") as handle:
            fields = list(dict.fromkeys(k for row in rows for k in row))
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")
    return rows


if __name__ == "__main__":
    main()
