#!/usr/bin/env python3
"""Self-attention kernels at one MfM shape, forward + backward, side by side (GPU).

Cases: torch SDPA on its cuDNN, flash and memory-efficient backends; Transformer Engine's
``DotProductAttention`` in bf16 and, with ``fp8_dpa=True``, in FP8 for each recipe and layout
asked for (and optionally with the backward in bf16: ``NVTE_FP8_DPA_BWD=0``). Each row gives the
backend TE selected (its own debug log), the median time, TFLOP/s (model FLOPs: forward 4*B*H*S^2*D,
backward twice that) and the relative error of the output and of dq against TE bf16. A case with
no backend is a row saying so.

  NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 python benchmarks/attention.py --tokens 22000 --heads 28
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def median_seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def te_recipe(name: str):
    from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling

    if name == "delayed":
        return DelayedScaling(fp8_dpa=True, amax_history_len=16, amax_compute_algo="max")
    return Float8CurrentScaling(fp8_dpa=True)


def disabled_reasons(log: io.StringIO) -> list[str]:
    """Why TE ruled its backends out for the last call (its "Disabling ..." debug lines)."""
    return list(dict.fromkeys(line.strip() for line in log.getvalue().splitlines() if "Disabling" in line))


def selected_backend(log: io.StringIO) -> str:
    """The last "Selected backend" line TE logged (NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2)."""
    lines = [line for line in log.getvalue().splitlines() if "Selected backend" in line]
    return lines[-1].split("Selected backend = ")[-1].rstrip(".") if lines else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=22000)
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layouts", nargs="+", default=["sbhd", "bshd"], help="TE qkv_format values")
    parser.add_argument("--recipes", nargs="+", default=["delayed", "current"], help="FP8 recipes (fp8_dpa=True)")
    parser.add_argument("--fp8-bwd-bf16", action="store_true", help="also FP8 forward with a bf16 backward")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py times GPU kernels: run it on a GPU machine")
    import transformer_engine.pytorch as te

    log = io.StringIO()
    logging.getLogger("DotProductAttention").addHandler(logging.StreamHandler(log))

    b, s, h, d = args.batch, args.tokens, args.heads, args.head_dim
    flops = 3 * 4 * b * h * s * s * d
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16, generator=generator)
                     for _ in range(4))

    def layout(t: torch.Tensor, fmt: str) -> torch.Tensor:
        return (t if fmt == "sbhd" else t.transpose(0, 1)).detach().contiguous().requires_grad_()

    def sdpa_case(backend):
        qb, kb, vb = (t.permute(1, 2, 0, 3).detach().contiguous().requires_grad_() for t in (q, k, v))
        gb = grad.permute(1, 2, 0, 3)

        def run():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qb, kb, vb)
            out.backward(gb)
            return out.permute(2, 0, 1, 3), qb.grad.permute(2, 0, 1, 3)
        return run

    def te_case(fmt: str, recipe: str | None):
        module = te.DotProductAttention(h, d, qkv_format=fmt, attn_mask_type="no_mask", attention_dropout=0.0)
        qt, kt, vt = (layout(t, fmt) for t in (q, k, v))
        gt = grad if fmt == "sbhd" else grad.transpose(0, 1)
        fp8 = te_recipe(recipe) if recipe else None

        def run():
            with te.autocast(enabled=True, recipe=fp8) if fp8 else nullcontext():
                out = module(qt, kt, vt)
            out.backward(gt.reshape(out.shape))
            out = out.view(*qt.shape)
            to_sbhd = (lambda t: t) if fmt == "sbhd" else (lambda t: t.transpose(0, 1))
            return to_sbhd(out), to_sbhd(qt.grad)
        return run

    cases = {f"te-bf16-{fmt}": te_case(fmt, None) for fmt in args.layouts}  # the first is the reference
    cases.update({name: sdpa_case(backend) for name, backend in SDPA.items()})
    for recipe in args.recipes:
        for fmt in args.layouts:
            cases[f"te-fp8-{recipe}-{fmt}"] = te_case(fmt, recipe)
            if args.fp8_bwd_bf16:
                cases[f"te-fp8-{recipe}-{fmt}-bf16bwd"] = te_case(fmt, recipe)

    reference = None
    print(f"attention B={b} S={s} H={h} D={d}, fwd+bwd model FLOPs {flops / 1e12:.2f} T")
    print(f"{'case':>32s} | {'backend':>40s} | {'ms':>8s} | {'TFLOP/s':>8s} | {'out err':>8s} | {'dq err':>8s}")
    for name, run in cases.items():
        os.environ["NVTE_FP8_DPA_BWD"] = "0" if name.endswith("bf16bwd") else "1"
        log.seek(0)
        log.truncate()
        try:
            out, dq = run()
            seconds = median_seconds(run, args.repeats)
        except Exception as error:  # noqa: BLE001 - a case without a backend is a result
            print(f"{name:>32s} | {'none: ' + str(error).splitlines()[0][:90]}")
            for reason in disabled_reasons(log):
                print(f"{'':>32s} |   {reason[:160]}")
            continue
        reference = reference or (out.detach().float(), dq.detach().float())
        errors = [f"{((a.detach().float() - r).norm() / r.norm()).item():.2e}" for a, r in zip((out, dq), reference)]
        backend = selected_backend(log) if name.startswith("te") else name
        print(f"{name:>32s} | {backend[:40]:>40s} | {seconds * 1e3:8.2f} | {flops / seconds / 1e12:8.1f} | "
              f"{errors[0]:>8s} | {errors[1]:>8s}")


if __name__ == "__main__":
    main()
