#!/usr/bin/env python3
"""Training throughput of the MfM DiT: step time, tokens/s, TFLOP/s, MFU, memory, roofline.

Each configuration runs the real training step (megatron schedule, DDP, optimizer) on random
on-device inputs, so the data pipeline is excluded. FLOPs come from ``training/flops.py``, the
formula the training logs use. The roofline ratio is the measured step time over the sum of the
best times of the blocks' GEMMs and attention kernels, each timed alone (forward + backward) on
the same device; it leaves out the adapter, embeddings and optimizer, so it reads "how far the
step is from its block kernels".

One launch sweeps layouts x presets x frames x resolutions x recompute x precision. Layouts
(``tp2``, ``tp2cp2``, ``pp2``...) share the launch's processes: megatron's parallel state is
torn down and rebuilt for each, and the data-parallel size is what the world size leaves.
MFU is against the named GPU's dense peak (--peak-tflops overrides it); the CPU gets no MFU.

  python tools/profile_throughput.py --presets tiny --frames 9 --height 64 --width 64      # CPU
  torchrun --nproc-per-node 8 tools/profile_throughput.py --presets mfm-2b --frames 97 \
      --height 352 --width 640 --layouts tp1 tp2 tp2cp2 tp4 --recompute none full \
      --precision bf16 fp8 --fp8-recipe delayed --output runs/profile                    # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mfm.utils.warnings_filter import quiet_known_warnings  # noqa: E402

quiet_known_warnings()

import torch.nn.functional as F  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from tqdm import tqdm  # noqa: E402

from megatron_mfm.config import ConfigError, load_config  # noqa: E402
from megatron_mfm.model.config import MfMConfig  # noqa: E402
from megatron_mfm.parallel.initialize import destroy_parallel  # noqa: E402
from megatron_mfm.training.flops import training_flops  # noqa: E402
from megatron_mfm.training.loop import H100_BF16_PEAK_TFLOPS, setup  # noqa: E402
from megatron_mfm.utils.atomic import atomic_write_text  # noqa: E402

TEXT_TOKENS = 77
# Dense tensor-core peaks (TFLOP/s) by GPU name and precision, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H100": {"bf16": H100_BF16_PEAK_TFLOPS, "fp8": 2 * H100_BF16_PEAK_TFLOPS},
    "H200": {"bf16": H100_BF16_PEAK_TFLOPS, "fp8": 2 * H100_BF16_PEAK_TFLOPS},
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
    "A100": {"bf16": 312.0},
}


@dataclass(frozen=True)
class Layout:
    """Model-parallel sizes of one configuration; data parallelism takes the rest of the world."""

    tp: int = 1
    pp: int = 1
    cp: int = 1

    @property
    def name(self) -> str:
        return f"tp{self.tp}pp{self.pp}cp{self.cp}"


def parse_layout(text: str) -> Layout:
    """``tp2``, ``tp2cp2``, ``pp2tp1``... (sizes left out are 1)."""
    if not re.fullmatch(r"((tp|pp|cp)\d+)+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: write a layout as tp<N>, pp<N>, cp<N> joined, e.g. tp2cp2")
    sizes = {k: int(v) for k, v in re.findall(r"(tp|pp|cp)(\d+)", text)}
    if min(sizes.values()) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be at least 1")
    return Layout(**sizes)


def peak_tflops(precision: str, override: float) -> tuple[float | None, str]:
    """(per-GPU dense peak, what it is) for MFU; (None, ...) on CPU or an unknown GPU."""
    if override:
        return override, f"--peak-tflops {override:g}"
    if not torch.cuda.is_available():
        return None, "cpu: no MFU"
    name = torch.cuda.get_device_name()
    for gpu, peaks in PEAK_TFLOPS.items():
        if gpu in name and precision in peaks:
            return peaks[precision], f"{name} {precision} dense {peaks[precision]:g} TFLOP/s"
    return None, f"{name}: peak unknown, pass --peak-tflops"


def fp8_autocast(precision: str, recipe_name: str):
    """Transformer Engine's FP8 autocast with the chosen scaling recipe (a no-op otherwise)."""
    if precision != "fp8":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    scaling = {"delayed": recipe.DelayedScaling, "current": recipe.Float8CurrentScaling}[recipe_name]
    return te.fp8_autocast(enabled=True, fp8_recipe=scaling(fp8_format=recipe.Format.HYBRID))


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
    """Sum over this stage's blocks of the best fwd+bwd time of each GEMM (this rank's share of
    the tokens and of the weights) and attention (all tokens, this rank's heads), timed alone."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    d, ffn, ct = config.hidden_size, config.ffn_hidden_size, config.text_hidden_size
    heads, hd = config.num_attention_heads // (tp * cp), config.kv_channels
    m, mt = batch * -(-tokens // cp), batch * TEXT_TOKENS
    gemms = [(m, d, 3 * d // tp), (m, d // tp, d), (m, d, d // tp), (mt, ct, 2 * d // tp), (m, d // tp, d),
             (m, d, ffn // tp), (m, ffn // tp, d)]
    total = 0.0
    for rows, k, n in gemms:
        x = torch.randn(rows, k, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(k, n, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(rows, n, device=device, dtype=dtype)
        total += timed(lambda: (x @ w).backward(grad), repeats, 2)
    for q_len, kv_len, q_heads in ((tokens, tokens, heads), (m // batch, TEXT_TOKENS, heads * cp)):
        q = torch.randn(batch, q_heads, q_len, hd, device=device, dtype=dtype, requires_grad=True)
        kv = torch.randn(batch, q_heads, kv_len, hd, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch, q_heads, q_len, hd, device=device, dtype=dtype)
        total += timed(lambda: F.scaled_dot_product_attention(q, kv, kv).backward(grad), repeats, 2)
    return total * config.num_layers / pp


RECOMPUTE = {
    "none": ["model.recompute=false"],
    "full": ["model.recompute=true"],
    "selective": ["model.recompute=false", "model.recompute_modules=[layernorm, mlp]"],
}


def profile_one(args, layout: Layout, preset: str, frames: int, height: int, width: int, recompute: str,
                precision: str) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data_parallel = world // (layout.tp * layout.pp * layout.cp)
    overrides = [
        f"model.preset={preset}", f"model.backend={args.backend}", *RECOMPUTE[recompute],
        f"parallel.tensor_parallel={layout.tp}", f"parallel.pipeline_parallel={layout.pp}",
        f"parallel.context_parallel={layout.cp}", f"parallel.sequence_parallel={layout.tp > 1}",
        f"train.precision={'bf16' if precision == 'fp8' else precision}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.global_batch_size={args.micro_batch_size * data_parallel}", "train.ema_decay=0",
        "checkpoint.save=", "logging.tensorboard_dir=", f"parallel.distributed_optimizer={args.distributed_optimizer}",
    ]
    trainer = setup(load_config(overrides=overrides))
    config, ddp = trainer.model_config, trainer.ddp
    batch = random_batch(config, frames, height, width, args.micro_batch_size, trainer.device, trainer.dtype)
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
    tokens = latent[0] * (latent[1] // config.patch_size) * (latent[2] // config.patch_size)

    def forward_step(data_iterator, model):
        inputs = next(data_iterator)
        with fp8_autocast(precision, args.fp8_recipe):  # forward only, as TE prescribes
            out = model(**inputs)
        return out, lambda output: (output.float().square().mean(), {})

    def step():
        for chunk in ddp:
            chunk.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=ddp, num_microbatches=1,
            seq_length=tokens, micro_batch_size=args.micro_batch_size, forward_only=False,
        )
        trainer.optimizer.step()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, args.iterations, args.warmup)
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    samples = args.micro_batch_size * data_parallel  # per step, over the whole launch
    flops = training_flops(config, latent, TEXT_TOKENS) * samples
    tflops = flops / seconds / world / 1e12
    peak, peak_name = peak_tflops(precision, args.peak_tflops)
    roofline = kernel_roofline_seconds(config, tokens, args.micro_batch_size, trainer.dtype, trainer.device,
                                       max(3, args.iterations))
    return {
        "layout": layout.name, "tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": data_parallel,
        "preset": preset, "frames": frames, "height": height, "width": width, "tokens": tokens,
        "recompute": recompute, "precision": precision,
        "fp8_recipe": args.fp8_recipe if precision == "fp8" else None,
        "backend": args.backend, "micro_batch_size": args.micro_batch_size,
        "step_s": seconds, "tokens_per_s": tokens * samples / seconds,
        "samples_per_s": samples / seconds, "flops_per_step": flops,
        "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None, "peak_tflops": peak, "peak": peak_name,
        "peak_memory_gib": peak_memory, "roofline_s": roofline, "roofline_ratio": seconds / roofline,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def print_table(rows: list[dict]) -> None:
    header = ("layout", "dp", "preset", "tokens", "recompute", "precision", "step_s", "tokens_per_s", "samples_per_s",
              "tflops_per_gpu", "mfu", "peak_memory_gib", "roofline_ratio")
    print(" | ".join(f"{h:>14s}" for h in header))
    for row in rows:
        if "error" in row:
            print(" | ".join(f"{row[h]!s:>14s}" for h in ("layout", "preset", "recompute", "precision")), "|", row["error"])
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
    parser.add_argument("--layouts", nargs="+", type=parse_layout, default=[Layout()],
                        help="model-parallel layouts to sweep, e.g. tp1 tp2 tp2cp2 pp2 (DP = world size / tp*pp*cp)")
    parser.add_argument("--frames", nargs="+", type=int, default=[9], help="pixel frames (4k+1) to sweep")
    parser.add_argument("--height", nargs="+", type=int, default=[64], help="pixel heights to sweep")
    parser.add_argument("--width", nargs="+", type=int, default=[64], help="pixel widths (paired with heights)")
    parser.add_argument("--recompute", nargs="+", default=["none"], choices=sorted(RECOMPUTE),
                        help="none, full (every block), selective (norms/modulation and MLP recomputed)")
    parser.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp8"],
                        help="default: bf16 on GPU, fp32 on CPU; fp8 = bf16 weights + Transformer Engine FP8 GEMMs")
    parser.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "current"],
                        help="FP8 scaling: delayed (amax history) or current (per-tensor, per step)")
    parser.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="shard optimizer state over DP x CP (what makes MfM-8B fit at CP4)")
    parser.add_argument("--iterations", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="per-GPU peak for MFU (default: the detected GPU's dense peak at the precision)")
    parser.add_argument("--output", default="", help="folder for results.json and results.csv")
    args = parser.parse_args(argv)
    if len(args.height) != len(args.width):
        parser.error("--height and --width take the same number of values (paired resolutions)")
    args.precision = args.precision or (["bf16"] if torch.cuda.is_available() else ["fp32"])
    if "fp8" in args.precision:
        from megatron_mfm.model.specs import transformer_engine_available

        if not torch.cuda.is_available() or not transformer_engine_available() or args.backend == "local":
            parser.error("--precision fp8 needs Transformer Engine layers on a GPU (--backend te or auto on a GPU "
                         "with transformer_engine installed)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for layout in args.layouts:
        if world % (layout.tp * layout.pp * layout.cp):
            parser.error(f"--layouts {layout.name}: tp*pp*cp does not divide the world size {world} "
                         f"(launch with torchrun --nproc-per-node N)")
    return args


def write_results(rows: list[dict], folder: Path) -> None:
    """results.json and results.csv, each replaced whole (never half-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.json", json.dumps(rows, indent=2) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "results.csv", table.getvalue())
    print(f"wrote {folder / 'results.json'} and {folder / 'results.csv'}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    sweep = list(itertools.product(args.layouts, args.presets, args.frames, list(zip(args.height, args.width)),
                                   args.recompute, args.precision))
    rows = []
    rank = int(os.environ.get("RANK", "0"))
    try:
        for layout, preset, frames, (height, width), recompute, precision in tqdm(
                sweep, desc="configurations", disable=rank != 0):
            what = {"layout": layout.name, "preset": preset, "frames": frames, "height": height, "width": width,
                    "recompute": recompute, "precision": precision}
            try:
                rows.append(profile_one(args, layout, preset, frames, height, width, recompute, precision))
            except torch.OutOfMemoryError:
                rows.append({**what, "error": "out of memory"})
            except ConfigError as error:  # e.g. a layout that does not divide this preset's heads
                rows.append({**what, "error": str(error)})
            parallel_state.destroy_model_parallel()  # the next configuration builds its own groups
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        destroy_parallel()
    if rank != 0:
        return rows
    print_table(rows)
    if args.output:
        write_results(rows, Path(args.output))
    return rows


if __name__ == "__main__":
    main()
