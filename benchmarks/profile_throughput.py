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

import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

from megatron.core import parallel_state
from tqdm import tqdm

from benchmarks import official_baseline
from benchmarks.isolated_rows import isolated_rows
from benchmarks.kernel_profile import KERNEL_CATEGORIES
from benchmarks.plain_baseline import compare_with_plain
from benchmarks.profile_row import profile_one
from benchmarks.profile_sweep import Layout, parse_args, sweep_rows
from benchmarks.timing import release_memory
from megatron_mfm.config import ConfigError
from megatron_mfm.parallel.initialize import destroy_parallel
from megatron_mfm.utils.atomic import atomic_write_text


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
        print("top operators (the kernel time each launches, by input shapes)")
        for operator in row["top_operators"]:
            print(f"  {operator['seconds']:8.4f} s {operator['calls']:6d} x  {operator['name']} {operator['shapes'][:90]}")


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
    args = parse_args(argv, __doc__)
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
