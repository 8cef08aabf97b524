"""The official MfM ``Transformer3DModel`` (github leeruibin/MfM) as the profiler's baseline.

``benchmarks/profile_throughput.py --compare-official PATH`` times the official model's training
step at each row's shape, from our initial weights on the same inputs and target, with its best
settings: its own ``enable_cached_compile=True`` (torch.compile of each block) on a GPU, no
gradient checkpointing unless the step runs out of memory (then its "full-block" checkpointing),
SDPA on cuDNN for forward AND backward (the checkpoint's recompute runs in backward; cuDNN first,
the memory-efficient kernel only where cuDNN refuses, e.g. the masked text attention), fused
AdamW with the run's settings and gradient clipping. Modes: ``bf16`` (bf16 weights) or ``amp``
(fp32 weights, bf16 autocast). Every row gets ``speedup_vs_official`` = official step / our step
and both peak memories. Nothing of the official code is copied: it is imported from PATH.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.timing import release_memory, timed
from megatron_mfm.diffusion.flow_matching import per_sample_mse
from megatron_mfm.model.config import to_official_config
from tools.official_repo import load_official_class

CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
OFFICIAL_MODES = ("bf16", "amp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compare-official", type=Path, default=None, metavar="PATH",
                        help="also time the official Transformer3DModel from a checkout of github leeruibin/MfM at "
                             "PATH (one process only)")
    parser.add_argument("--official-mode", default="bf16", choices=OFFICIAL_MODES,
                        help="official weights: bf16, or amp (fp32 weights, bf16 autocast)")
    parser.add_argument("--official-compile", default=None, choices=["on", "off"],
                        help="the official enable_cached_compile (default: on with a GPU, off on the CPU)")


def official_inputs(inputs: dict[str, torch.Tensor]) -> dict:
    """Our model's inputs under the official forward's names."""
    return dict(hidden_states=inputs["latents"], timestep=inputs["timestep"],
                encoder_hidden_states=inputs["text"], encoder_attention_mask=inputs["text_mask"],
                conditional_pixel_values=inputs["condition"][:, :-1], conditional_masks=inputs["condition"][:, -1:],
                motion_score=inputs["motion_score"], return_dict=False)


def build_official(repo: Path, case, mode: str, compile_blocks: bool, checkpoint_blocks: bool) -> torch.nn.Module:
    """The official model with our initial weights (``case.weights``, official names), on the
    inputs' device, bf16 weights or fp32 for amp (built on that device: its non-persistent
    buffers are computed at construction)."""
    official_class = load_official_class(repo)
    config = {**to_official_config(case.config), "enable_cached_compile": compile_blocks,
              "gradient_checkpointing": "full-block" if checkpoint_blocks else None}
    latents = case.inputs["latents"]
    with torch.device(latents.device):
        model = official_class.from_config(config)
    model = model.to(device=latents.device, dtype=torch.float32 if mode == "amp" else latents.dtype)
    model.load_state_dict(case.weights)
    model.post_setup_sequence_parallel(None)
    return model.train()


def attention_on_cudnn() -> contextlib.AbstractContextManager:
    """SDPA restricted to cuDNN first (on the CPU: torch's choice)."""
    return sdpa_kernel(CUDNN_FIRST, set_priority=True) if torch.cuda.is_available() else contextlib.nullcontext()


def official_step(model: torch.nn.Module, case, mode: str):
    """One training step (forward, MSE, backward, clipping, fused AdamW, decay on matrices only
    as megatron's optimizer), returning its loss; the attention backend wraps backward too."""
    params, opt = list(model.parameters()), case.optimizer
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() > 1]},
         {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay,
        fused=torch.cuda.is_available())
    inputs = official_inputs(case.inputs)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if mode == "amp" and torch.cuda.is_available()
                else contextlib.nullcontext())

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with attention_on_cudnn():
            with autocast:
                output = model(**inputs)[0]
            loss = per_sample_mse(output.to(case.target.dtype), case.target).mean()
            loss.backward()
        if opt.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, opt.clip_grad)
        optimizer.step()
        return loss.detach()

    return step


def time_official(args, case) -> dict:
    """Step time, peak memory and losses of the official step; retried with full-block
    checkpointing when the step does not fit."""
    compile_blocks = (args.official_compile or ("on" if torch.cuda.is_available() else "off")) == "on"
    for checkpoint_blocks in (False, True):
        model = step = None  # frees an attempt that ran out of memory
        release_memory()
        losses = []
        try:
            model = build_official(args.compare_official, case, args.official_mode, compile_blocks, checkpoint_blocks)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            step = official_step(model, case, args.official_mode)
            seconds = timed(lambda: losses.append(step()), args.iterations, args.warmup)
        except torch.OutOfMemoryError:
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        del model, step
        release_memory()
        return {"official_step_s": seconds, "official_peak_memory_gib": peak,
                "official_losses": torch.stack(losses[-args.iterations:]).float().tolist(),
                "official_settings": f"{args.official_mode}, enable_cached_compile={compile_blocks}, "
                                     f"gradient_checkpointing={'full-block' if checkpoint_blocks else None}, "
                                     "sdpa cudnn (efficient where refused), fused AdamW"}
    return {"official_error": "out of memory, with and without full-block checkpointing"}


def official_key(row: dict) -> tuple:
    """Rows that share an official step: same preset, shape and weight dtype (fp8 rows compare
    against the bf16 official step)."""
    return row["preset"], row["frames"], row["height"], row["width"], "fp32" if row["precision"] == "fp32" else "bf16"


def compare_rows(args, rows: list[dict], cases: dict) -> None:
    """Adds the official columns to every row (after our rows: the official compile changes
    dynamo's global settings)."""
    measured = {key: time_official(args, case) for key, case in cases.items()}
    for row in rows:
        if "error" not in row and official_key(row) in measured:
            add_official_columns(row, measured[official_key(row)])


def add_official_columns(row: dict, official: dict) -> None:
    """The official step's columns, and ``speedup_vs_official`` where both steps were timed."""
    row.update(official)
    if "official_step_s" in official and "step_s" in row:
        row["speedup_vs_official"] = official["official_step_s"] / row["step_s"]
