#!/usr/bin/env python3
"""Training throughput of the MfM DiT: step time, tokens/s, TFLOP/s, MFU, memory, roofline.

Each configuration runs the real training step (megatron schedule, DDP, optimizer; flow-matching
MSE against a random velocity) on random on-device inputs drawn from the training seed, so the
data pipeline is excluded and every row sees the same numbers; each timed step's loss is kept
("losses": bf16 and fp8 rows compare at the same seed). FLOPs come from ``training/flops.py``, the
formula the training logs use. The roofline ratio is the measured step time over the sum of the
best times of the blocks' GEMMs and attention kernels, each timed alone (forward + backward) on
the same device; it leaves out the adapter, embeddings and optimizer, so it reads "how far the
step is from its block kernels".

One launch sweeps layouts x presets x frames x resolutions x recompute x precision. Layouts
(``tp2``, ``tp2cp2``, ``pp2``...) share the launch's processes: megatron's parallel state is
torn down and rebuilt for each, and the data-parallel size is what the world size leaves.
MFU is against the named GPU's dense bf16 peak for every row, FP8 rows included, so rows compare
(--peak-tflops overrides it); FP8 rows also get ``fp8_peak_fraction``, against the dense FP8 peak.
The CPU gets no MFU.
FP8 rows set ``train.precision=fp8`` and ``train.fp8_recipe``: the model enters Transformer
Engine's FP8 autocast itself, as in training; one launch sweeps several recipes.

--compare-plain (one process) also times, for every row, the same training step of
``benchmarks/plain_mfm.py``: a plain-PyTorch implementation of the same architecture
(``F.scaled_dot_product_attention`` on the named backends, torch.optim.AdamW with the run's
settings and gradient clipping, bf16 weights for bf16 and fp8 rows, each block checkpointed when
the row recomputes fully), started from our initial weights on the same inputs. The row gets its
step time, MFU, memory, losses and ``speedup_vs_plain`` = plain step / our step.

--compare-official PATH (one process) times the official ``Transformer3DModel`` from a checkout of
github leeruibin/MfM at each row's shape with its best settings (``benchmarks/official_baseline.py``)
and gives every row ``speedup_vs_official`` and both peak memories: the headline comparison.
--attention-backend sweeps the core attention (auto, fa4, cudnn, sdpa); --recompute auto picks the
recomputed blocks from measured memory (the row's ``recompute_decision``), mlp_act recomputes only
the MLP's GELU output; --cuda-graph full_iteration captures the forward and backward of the step
(megatron's FullCudaGraphWrapper; the optimizer step stays eager) after one eager step and replays
it; --optimizer-state bf16 keeps bf16 gradient buffers and bf16 Adam moments
(the distributed optimizer, Transformer Engine's FusedAdam). --isolate-rows runs every row, and
the official step, in a process of its own (``benchmarks/isolated_rows.py``): each row's peak
memory is then its own, not raised by what earlier rows left cached.

  python benchmarks/profile_throughput.py --presets tiny --frames 9 --height 64 --width 64      # CPU
  torchrun --nproc-per-node 8 benchmarks/profile_throughput.py --presets mfm-2b --frames 97 \
      --height 352 --width 640 --layouts tp1 tp2 tp2cp2 tp4 --recompute none full \
      --precision bf16 fp8 --fp8-recipe delayed current --output runs/profile            # GPU
  python benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 \
      --recompute full --compare-plain --output runs/plain                                 # 1 GPU
  python benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 \
      --glue compiled --attention-backend cudnn fa4 --recompute none auto --compare-official ~/src/MfM  # 1 GPU
  python benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 --glue compiled \
      --recompute none mlp_act --optimizer-state fp32 bf16 --isolate-rows --output runs/memory   # 1 GPU
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

import megatron.core
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from tqdm import tqdm

from megatron_mfm.config import FP8_RECIPES, ConfigError, load_config
from megatron_mfm.diffusion.flow_matching import per_sample_mse
from megatron_mfm.model.attention_backends import ATTENTION_BACKENDS
from megatron_mfm.model.config import MfMConfig
from megatron_mfm.model.geometry import clip_tokens, latent_shape, token_grid
from megatron_mfm.model.recompute_budget import after_optimizer_step
from megatron_mfm.parallel.initialize import destroy_parallel
from benchmarks import official_baseline
from benchmarks.isolated_rows import ROW_PROCESSES, isolated_rows
from benchmarks.kernel_profile import KERNEL_CATEGORIES, kernel_breakdown, kernel_roofline_seconds
from benchmarks.plain_baseline import SDPA_BACKENDS, PlainCase, compare_with_plain
from benchmarks.timing import TEXT_TOKENS, release_memory, timed
from megatron_mfm.training.flops import gpu_peak_tflops, training_flops
from megatron_mfm.training.loop import setup
from megatron_mfm.utils.atomic import atomic_write_text



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


def random_batch(config: MfMConfig, frames: int, height: int, width: int, batch: int, device: torch.device,
                 dtype: torch.dtype, seed: int) -> tuple[dict, torch.Tensor]:
    """Model inputs and a velocity target, drawn from ``seed`` alone (not from whatever the
    model's construction left in the global generator)."""
    generator = torch.Generator(device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    _, t, h, w = latent_shape(frames, height, width)
    inputs = dict(
        latents=normal(batch, config.in_channels, t, h, w),
        timestep=torch.rand(batch, generator=generator, device=device) * 1000,
        text=normal(batch, TEXT_TOKENS, config.text_hidden_size),
        text_mask=torch.ones(batch, TEXT_TOKENS, device=device),
        condition=normal(batch, config.condition_channels, frames, height, width),
        motion_score=torch.full((batch,), 5.0, device=device),
    )
    return inputs, normal(batch, config.out_channels, t, h, w)


def velocity_loss(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Flow-matching MSE against ``target``, as in training; the dict carries the value to the
    row's losses (a copy: megatron scales the loss by the CP size in place)."""
    loss = per_sample_mse(output, target).mean()
    return loss, {"loss": loss.detach().clone()}


def launch_losses(losses: list[torch.Tensor], copies: int) -> list[float]:
    """Each step's loss averaged over data-parallel ranks. Ranks of the last pipeline stage hold
    a value (each TP and CP rank a copy), the others zero: so the world's sum over tp * cp * dp."""
    total = torch.stack(losses).float()
    dist.all_reduce(total)
    return (total / copies).tolist()


"""Kernel-name patterns (first match wins, case-insensitive) that group a profiled step."""


RECOMPUTE = {
    "none": ["model.recompute=false"],
    "full": ["model.recompute=true"],
    "selective": ["model.recompute=false", "model.recompute_modules=[layernorm, mlp]"],
    "mlp_act": ["model.recompute=false", "model.recompute_modules=[mlp_act]"],
    "auto": ["model.recompute=auto"],
}
OPTIMIZER_STATES = {
    "fp32": [],
    "bf16": ["optimizer.grad_dtype=bf16", "optimizer.moments_dtype=bf16", "parallel.distributed_optimizer=true"],
}
"""``--optimizer-state``: fp32 gradient buffers and Adam moments, or bf16 ones (16-bit moments
need the distributed optimizer; on one GPU it shards nothing)."""
PARTIAL_RECOMPUTE = re.compile(r"first(\d+)")
"""``first<N>``: full recompute of the first N blocks of each stage only (model.recompute_num_layers)."""


def parse_recompute(text: str) -> str:
    if text in RECOMPUTE or PARTIAL_RECOMPUTE.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: choose {', '.join(RECOMPUTE)} or first<N> (recompute N blocks)")


def recompute_overrides(recompute: str) -> list[str]:
    partial = PARTIAL_RECOMPUTE.fullmatch(recompute)
    if partial:
        return ["model.recompute=true", f"model.recompute_num_layers={partial[1]}"]
    return RECOMPUTE[recompute]


def profile_one(args, layout: Layout, what: dict) -> tuple[dict, PlainCase | None]:
    """Our row (``what`` names it), and with --compare-plain or --compare-official what the plain
    or official step of the row needs (only that under ``--row-process official``)."""
    preset, frames, height, width = what["preset"], what["frames"], what["height"], what["width"]
    recompute, glue, precision, fp8_recipe = what["recompute"], what["glue"], what["precision"], what["fp8_recipe"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data_parallel = world // (layout.tp * layout.pp * layout.cp)
    overrides = [
        f"model.preset={preset}", f"model.backend={args.backend}", *recompute_overrides(recompute),
        f"model.compile_glue={glue == 'compiled'}", f"model.attention_backend={what['attention_backend']}",
        f"parallel.tensor_parallel={layout.tp}", f"parallel.pipeline_parallel={layout.pp}",
        f"parallel.context_parallel={layout.cp}", f"parallel.sequence_parallel={layout.tp > 1}",
        f"train.precision={precision}", *([f"train.fp8_recipe={fp8_recipe}"] if fp8_recipe else []),
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.global_batch_size={args.micro_batch_size * data_parallel}", "train.ema_decay=0",
        "checkpoint.save=", "logging.tensorboard_dir=", f"parallel.distributed_optimizer={args.distributed_optimizer}",
        *OPTIMIZER_STATES[what["optimizer_state"]], *args.set,
    ]
    trainer = setup(load_config(overrides=overrides))
    config, ddp = trainer.model_config, trainer.ddp
    batch, target = random_batch(config, frames, height, width, args.micro_batch_size, trainer.device, trainer.dtype,
                                 trainer.config.train.seed)
    latent = latent_shape(frames, height, width)[1:]
    tokens = clip_tokens(frames, height, width)
    # the plain step checkpoints every block of full and first<N> rows
    full_blocks = recompute == "full" or PARTIAL_RECOMPUTE.fullmatch(recompute) is not None
    wants_case = args.compare_plain or args.compare_official
    plain = PlainCase.before_training(trainer, batch, target, full_blocks) if wants_case else None
    if args.row_process == "official":
        return {}, plain

    def forward_step(data_iterator, model):
        return model(**next(data_iterator)), lambda output: velocity_loss(output, target)

    losses = []
    forward_backward = get_forward_backward_func()
    if what["cuda_graph"] == "full_iteration":
        forward_backward = full_iteration_graph(forward_backward)
        batch["text_mask"] = None  # all ones, which the model drops anyway, but only after a host sync

    def step():
        for chunk in ddp:
            chunk.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        reported = forward_backward(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=ddp, num_microbatches=1,
            seq_length=trainer.model[0].pipeline_seq_length(token_grid(latent, config.patch_size)),
            micro_batch_size=args.micro_batch_size, forward_only=False,
        )
        trainer.optimizer.step()
        after_optimizer_step(trainer.model)
        # a copy: a replayed graph rewrites its output in place
        losses.append(reported[0]["loss"].clone() if reported else torch.zeros((), device=trainer.device))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, args.iterations, args.warmup)
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    step_losses = launch_losses(losses[-args.iterations:], layout.tp * layout.cp * data_parallel)
    breakdown = kernel_breakdown(step) if args.kernel_breakdown else {}
    samples = args.micro_batch_size * data_parallel  # per step, over the whole launch
    flops = training_flops(config, latent, TEXT_TOKENS) * samples
    tflops = flops / seconds / world / 1e12
    peak, peak_name = gpu_peak_tflops("bf16" if precision == "fp8" else precision, args.peak_tflops)
    fp8_peak = gpu_peak_tflops("fp8", args.peak_tflops)[0] if precision == "fp8" else None
    roofline = kernel_roofline_seconds(config, tokens, args.micro_batch_size, trainer.dtype, trainer.device,
                                       max(3, args.iterations))
    row = {
        **what, "tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": data_parallel, "tokens": tokens,
        "core_attention": core_attention_name(trainer.model[0]),
        **recompute_decision(trainer.model[0]),
        "backend": args.backend, "micro_batch_size": args.micro_batch_size,
        "step_s": seconds, "tokens_per_s": tokens * samples / seconds,
        "samples_per_s": samples / seconds, "flops_per_step": flops,
        "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None, "peak_tflops": peak, "peak": peak_name,
        "fp8_peak_fraction": tflops / fp8_peak if fp8_peak else None,
        "peak_memory_gib": peak_memory, "roofline_s": roofline, "roofline_ratio": seconds / roofline,
        "losses": step_losses,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "megatron_core": megatron.core.__version__,
        **breakdown,
    }
    return row, plain


def full_iteration_graph(forward_backward):
    """megatron's full-iteration CUDA graph around ``forward_backward``: eager on the first call,
    captured on the second, replayed after. Its graphs and input buffers live on the class; they
    are cleared so that each row captures its own."""
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper, StaticBufferLoader

    FullCudaGraphWrapper.curr_iteration = {"training": 0, "validation": 0}
    FullCudaGraphWrapper.cuda_graph = {"training": None, "validation": None}
    StaticBufferLoader.static_buffers = {"training": [], "validation": []}
    return FullCudaGraphWrapper(forward_backward, cuda_graph_warmup_steps=1)


def core_attention_name(model: torch.nn.Module) -> str | None:
    """The class behind the first block's self-attention (what ``auto`` resolved to)."""
    return type(model.layers[0].self_attention.core_attention).__name__ if len(model.layers) else None


def recompute_decision(model: torch.nn.Module) -> dict:
    """``recompute=auto``'s measured block memory, prediction and choice (empty otherwise)."""
    auto = getattr(model, "auto_recompute", None)
    return {"recompute_decision": auto.decision} if auto is not None else {}


TABLE = ("layout", "dp", "preset", "tokens", "recompute", "glue", "attention_backend", "precision", "optimizer_state",
         "cuda_graph", "step_s",
         "tokens_per_s", "samples_per_s", "tflops_per_gpu", "mfu", "peak_memory_gib", "roofline_ratio")
PLAIN_TABLE = ("plain_step_s", "plain_mfu", "speedup_vs_plain")
OFFICIAL_TABLE = ("official_step_s", "official_peak_memory_gib", "speedup_vs_official")


def cell(row: dict, column: str) -> str:
    """One table cell, 14 wide: fp8 rows name their recipe, a plain OOM reads "oom"."""
    value = row.get(column)
    if column == "precision" and row.get("fp8_recipe"):
        value = f"fp8/{row['fp8_recipe']}"
    if column == "plain_step_s" and "plain_error" in row:
        value = "oom"
    if value is None:
        return f"{'-':>14s}"
    if column.endswith("mfu"):
        return f"{value:>14.1%}"
    if isinstance(value, float):
        return f"{value:>14.4g}"
    return f"{value!s:>14s}"


def print_table(rows: list[dict]) -> None:
    header = (TABLE + (PLAIN_TABLE if any("plain_attention" in row for row in rows) else ())
              + (OFFICIAL_TABLE if any("official_step_s" in row for row in rows) else ()))
    print(" | ".join(f"{h:>14s}" for h in header))
    for row in rows:
        if "error" in row:
            print(" | ".join(cell(row, h) for h in ("layout", "preset", "recompute", "glue", "precision")), "|",
                  row["error"])
        else:
            print(" | ".join(cell(row, h) for h in header))
    profiled = [row for row in rows if "kernel_seconds" in row]
    if profiled:
        print_breakdown(profiled)


def print_breakdown(rows: list[dict]) -> None:
    """Per row: seconds of kernels per category (one profiled step), their sum against the
    step time (the rest: the GPU waiting on the host), and the row's top kernels."""
    categories = [label for label, _ in KERNEL_CATEGORIES if any(label in row["kernel_seconds"] for row in rows)]
    print("\nkernel time per step (s), one profiled step per row")
    print(" | ".join(f"{h:>14s}" for h in ("recompute", "glue", "precision", "step_s", "busy_s", *categories)))
    for row in rows:
        values = [row["step_s"], row["kernel_busy_s"], *(row["kernel_seconds"].get(c, 0.0) for c in categories)]
        print(" | ".join([cell(row, "recompute"), cell(row, "glue"), cell(row, "precision"),
                          *(f"{v:>14.4f}" for v in values)]))
    for row in rows:
        print(f"\ntop kernels: {row['recompute']} / {row['glue']} / {cell(row, 'precision').strip()}")
        for kernel in row["top_kernels"]:
            print(f"  {kernel['seconds']:8.4f} s {kernel['calls']:6d} x  {kernel['name'][:110]}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="model presets to sweep")
    parser.add_argument("--layouts", nargs="+", type=parse_layout, default=[Layout()],
                        help="model-parallel layouts to sweep, e.g. tp1 tp2 tp2cp2 pp2 (DP = world size / tp*pp*cp)")
    parser.add_argument("--frames", nargs="+", type=int, default=[9], help="pixel frames (4k+1) to sweep")
    parser.add_argument("--height", nargs="+", type=int, default=[64], help="pixel heights to sweep")
    parser.add_argument("--width", nargs="+", type=int, default=[64], help="pixel widths (paired with heights)")
    parser.add_argument("--recompute", nargs="+", default=["none"], type=parse_recompute,
                        help="none, full (every block), first<N> (the first N blocks of each stage), "
                             "selective (norms/modulation and MLP recomputed), mlp_act (the MLP's GELU output "
                             "only), auto")
    parser.add_argument("--optimizer-state", nargs="+", default=["fp32"], choices=sorted(OPTIMIZER_STATES),
                        help="gradient buffers and Adam moments to sweep: fp32, or bf16 (with the distributed "
                             "optimizer and Transformer Engine's FusedAdam)")
    parser.add_argument("--isolate-rows", action="store_true",
                        help="run every row (and the official step) in a process of its own: clean peak memory")
    parser.add_argument("--row-process", choices=ROW_PROCESSES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--glue", nargs="+", default=["eager"], choices=["eager", "compiled"],
                        help="the blocks' norm/modulation/RoPE/gate glue: eager, or fused by torch.compile "
                             "(model.compile_glue)")
    parser.add_argument("--attention-backend", nargs="+", default=["auto"], choices=ATTENTION_BACKENDS,
                        help="core attentions to sweep (model.attention_backend)")
    parser.add_argument("--cuda-graph", nargs="+", default=["none"], choices=["none", "full_iteration"],
                        help="full_iteration: megatron's full-iteration CUDA graph over forward and backward "
                             "(one GPU process, no pipeline parallelism)")
    parser.add_argument("--kernel-breakdown", action="store_true",
                        help="profile one more step per row: kernel time per category and the top kernels")
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                        help="extra config overrides for every row, e.g. parallel.context_parallel_comm=p2p")
    parser.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp8"],
                        help="default: bf16 on GPU, fp32 on CPU; fp8 = bf16 weights + Transformer Engine FP8 GEMMs")
    parser.add_argument("--fp8-recipe", nargs="+", default=["delayed"], choices=sorted(FP8_RECIPES),
                        help="FP8 scalings to sweep (one fp8 row each): delayed (amax history) or current "
                             "(per-tensor, per step)")
    parser.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="shard optimizer state over DP x CP (what makes MfM-8B fit at CP4)")
    parser.add_argument("--iterations", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="per-GPU peak for MFU (default: the detected GPU's dense peak at the precision)")
    parser.add_argument("--compare-plain", action="store_true",
                        help="also time the plain-PyTorch SDPA implementation's step (one process only)")
    parser.add_argument("--plain-sdpa-backends", nargs="+", default=["cudnn", "flash", "efficient"],
                        choices=sorted(SDPA_BACKENDS),
                        help="SDPA backends the plain model may use, in priority order (the text "
                             "cross-attention carries a key mask, which flash does not take: list another after it)")
    official_baseline.add_arguments(parser)
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
    if "full_iteration" in args.cuda_graph and not torch.cuda.is_available():
        parser.error("--cuda-graph full_iteration captures CUDA graphs: it needs a GPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.compare_plain and world != 1:
        parser.error(f"--compare-plain runs the plain model in one process; launch without torchrun "
                     f"(world size {world})")
    if args.compare_official and (world != 1 or not (args.compare_official / "mfm").is_dir()):
        parser.error(f"--compare-official {args.compare_official}: needs one process (no torchrun) and a checkout of "
                     "github leeruibin/MfM (its mfm/ package) at that path")
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


def sweep_rows(args) -> list[tuple[Layout, dict]]:
    """Every configuration of the launch in order: its layout and the columns that name its row."""
    precisions = [(p, recipe) for p in args.precision for recipe in (args.fp8_recipe if p == "fp8" else [None])]
    product = itertools.product(args.layouts, args.presets, args.frames, list(zip(args.height, args.width)),
                                args.recompute, args.glue, args.attention_backend, precisions, args.optimizer_state,
                                args.cuda_graph)
    return [(layout, {"layout": layout.name, "preset": preset, "frames": frames, "height": height, "width": width,
                      "recompute": recompute, "glue": glue, "attention_backend": attention, "precision": precision,
                      "fp8_recipe": recipe, "optimizer_state": state, "cuda_graph": graph})
            for layout, preset, frames, (height, width), recompute, glue, attention, (precision, recipe), state, graph
            in product]


def run_sweep(args, sweep: list[tuple[Layout, dict]]) -> list[dict]:
    """Every row in this launch's processes, one after another."""
    rows, plain_measured, official_cases = [], {}, {}
    rank = int(os.environ.get("RANK", "0"))
    try:
        for layout, what in tqdm(sweep, desc="configurations", disable=rank != 0):
            plain = None
            try:
                row, plain = profile_one(args, layout, what)
            except torch.OutOfMemoryError:
                row = {"error": "out of memory"}
            except ConfigError as error:  # e.g. a layout that does not divide this preset's heads
                row = {"error": str(error)}
            row = {**what, **row}
            parallel_state.destroy_model_parallel()  # the next configuration builds its own groups
            release_memory()
            if plain is not None and args.compare_plain:
                row.update(compare_with_plain(args, row, plain, plain_measured))
            if plain is not None and args.compare_official:
                official_cases.setdefault(official_baseline.official_key(row), plain)
            rows.append(row)
            if args.output and rank == 0:
                write_results(rows, Path(args.output))  # partial results survive a later failure
        if official_cases:
            official_baseline.compare_rows(args, rows, official_cases)
    finally:
        destroy_parallel()
    return rows


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    sweep = sweep_rows(args)
    if args.isolate_rows and args.row_process is None:
        folder = Path(args.output or tempfile.mkdtemp(prefix="profile_rows_")) / "rows"
        rows = isolated_rows(argv, [what for _, what in sweep], folder, args.compare_official is not None)
    else:
        rows = run_sweep(args, sweep)
    if int(os.environ.get("RANK", "0")) != 0:
        return rows
    print_table(rows)
    if args.output:
        write_results(rows, Path(args.output))
    return rows


if __name__ == "__main__":
    main()
