"""The sweep of ``benchmarks/profile_throughput.py``: its command line, the rows it names (layouts
x presets x shapes x recompute x glue x attention x precision x optimizer state x CUDA graph) and
the run config of each row."""

from __future__ import annotations

import argparse
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import official_baseline
from benchmarks.isolated_rows import ROW_PROCESSES
from benchmarks.plain_baseline import SDPA_BACKENDS
from megatron_mfm.config import FP8_RECIPES, RunConfig, load_config
from megatron_mfm.model.attention_backends import ATTENTION_BACKENDS
from megatron_mfm.model.presets import TUNED_GLUE


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


RECOMPUTE = {
    "none": ["model.recompute=false"],
    "full": ["model.recompute=true"],
    "selective": ["model.recompute=false", "model.recompute_modules=[layernorm, mlp]"],
    "mlp_act": ["model.recompute=false", "model.recompute_modules=[mlp_act]"],
    "outputs": ["model.recompute=false", "model.recompute_modules=[layernorm, mlp_act]"],
    "auto": ["model.recompute=auto"],
}
GLUE = {"eager": False, "compiled": True, "tuned": TUNED_GLUE}
"""--glue -> model.compile_glue."""
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


def recomputes_whole_blocks(recompute: str) -> bool:
    """Full and first<N> rows: the plain step checkpoints every block of them."""
    return recompute == "full" or PARTIAL_RECOMPUTE.fullmatch(recompute) is not None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_size(layout: Layout) -> int:
    return world_size() // (layout.tp * layout.pp * layout.cp)


def row_config(args, layout: Layout, what: dict) -> RunConfig:
    """The run config of the row ``what`` names: one micro-batch per data-parallel rank, no EMA,
    no checkpoints or logs."""
    data_parallel = data_parallel_size(layout)
    overrides = [
        f"model.preset={what['preset']}", f"model.backend={args.backend}", *recompute_overrides(what["recompute"]),
        f"model.compile_glue={GLUE[what['glue']]}", f"model.attention_backend={what['attention_backend']}",
        f"parallel.tensor_parallel={layout.tp}", f"parallel.pipeline_parallel={layout.pp}",
        f"parallel.context_parallel={layout.cp}", f"parallel.sequence_parallel={layout.tp > 1}",
        f"train.precision={what['precision']}",
        *([f"train.fp8_recipe={what['fp8_recipe']}"] if what["fp8_recipe"] else []),
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.global_batch_size={args.micro_batch_size * data_parallel}", "train.ema_decay=0",
        "checkpoint.save=", "logging.tensorboard_dir=", f"parallel.distributed_optimizer={args.distributed_optimizer}",
        *OPTIMIZER_STATES[what["optimizer_state"]], *args.set,
    ]
    return load_config(overrides=overrides)


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


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The options whose values multiply into rows."""
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="model presets to sweep")
    parser.add_argument("--layouts", nargs="+", type=parse_layout, default=[Layout()],
                        help="model-parallel layouts to sweep, e.g. tp1 tp2 tp2cp2 pp2 (DP = world size / tp*pp*cp)")
    parser.add_argument("--frames", nargs="+", type=int, default=[9], help="pixel frames (4k+1) to sweep")
    parser.add_argument("--height", nargs="+", type=int, default=[64], help="pixel heights to sweep")
    parser.add_argument("--width", nargs="+", type=int, default=[64], help="pixel widths (paired with heights)")
    parser.add_argument("--recompute", nargs="+", default=["none"], type=parse_recompute,
                        help="none, full (every block), first<N> (the first N blocks of each stage), "
                             "selective (norm outputs and the MLP recomputed), mlp_act (the MLP's GELU output "
                             "only), outputs (the norm outputs and the GELU output: layernorm + mlp_act), auto")
    parser.add_argument("--optimizer-state", nargs="+", default=["fp32"], choices=sorted(OPTIMIZER_STATES),
                        help="gradient buffers and Adam moments to sweep: fp32, or bf16 (with the distributed "
                             "optimizer and Transformer Engine's FusedAdam)")
    parser.add_argument("--glue", nargs="+", default=["eager"], choices=list(GLUE),
                        help="the blocks' norm/modulation/RoPE/gate glue: eager, fused by torch.compile, or "
                             "fused with tuned kernels (model.compile_glue)")
    parser.add_argument("--attention-backend", nargs="+", default=["auto"], choices=ATTENTION_BACKENDS,
                        help="core attentions to sweep (model.attention_backend)")
    parser.add_argument("--cuda-graph", nargs="+", default=["none"], choices=["none", "full_iteration"],
                        help="full_iteration: megatron's full-iteration CUDA graph over forward and backward "
                             "(one GPU process, no pipeline parallelism)")
    parser.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp8"],
                        help="default: bf16 on GPU, fp32 on CPU; fp8 = bf16 weights + Transformer Engine FP8 GEMMs")
    parser.add_argument("--fp8-recipe", nargs="+", default=["delayed"], choices=sorted(FP8_RECIPES),
                        help="FP8 scalings to sweep (one fp8 row each): delayed (amax history) or current "
                             "(per-tensor, per step)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every row shares: processes, timing, baselines, output."""
    parser.add_argument("--isolate-rows", action="store_true",
                        help="run every row (and the official step) in a process of its own: clean peak memory")
    parser.add_argument("--row-process", choices=ROW_PROCESSES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kernel-breakdown", action="store_true",
                        help="profile one more step per row: kernel time per category and the top kernels")
    parser.add_argument("--kernel-trace", type=Path, metavar="DIR",
                        help="with --kernel-breakdown: also write each profiled step's Chrome trace here "
                             "(the timeline shows where the GPU waits on the host)")
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                        help="extra config overrides for every row, e.g. parallel.context_parallel_comm=p2p")
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


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations this machine or launch cannot run, as argparse errors naming the flag."""
    if len(args.height) != len(args.width):
        parser.error("--height and --width take the same number of values (paired resolutions)")
    if "fp8" in args.precision:
        from megatron_mfm.model.specs import transformer_engine_available

        if not torch.cuda.is_available() or not transformer_engine_available() or args.backend == "local":
            parser.error("--precision fp8 needs Transformer Engine layers on a GPU (--backend te or auto on a GPU "
                         "with transformer_engine installed)")
    if "full_iteration" in args.cuda_graph and not torch.cuda.is_available():
        parser.error("--cuda-graph full_iteration captures CUDA graphs: it needs a GPU")
    world = world_size()
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


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    """The profiler's options (``description``: its --help text)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(parser)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.precision = args.precision or (["bf16"] if torch.cuda.is_available() else ["fp32"])
    check_arguments(parser, args)
    return args
