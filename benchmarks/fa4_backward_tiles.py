#!/usr/bin/env python3
"""FlashAttention-4's sm90 backward at one MfM shape under other tile configurations (GPU).

FA4 picks its Hopper backward tiles in ``flash_attn.cute.interface._tile_size_bwd_sm90`` from the
head dim alone (C++ FA3's choice, benchmarked on H100); nothing in its API sets them. Each
candidate here replaces that function in a process of its own (a bad tile can fault the
context), times the backward (CUDA events, median, model FLOPs: backward = 8*B*H*S^2*D) and
checks dq/dk/dv against torch SDPA on cuDNN. The self-attention backward is ~41% of the MfM-2B
step (docs/PERFORMANCE.md), so a faster tile is the step's largest single lever.

  python benchmarks/fa4_backward_tiles.py --tokens 22000 --heads 28 --output runs/fa4_tiles.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

# BwdConfig fields that differ from FA4's head-dim-64 choice (m128 n128, Q/dO/PdS stages 2,
# SdP_swapAB, AtomLayouts MSdP 1 / NdKV 2 / MdQ 2, two MMA warp groups). Fields outside FA4's
# compile key (num_stages_PdS) are not varied: the cache would hand back the default's kernel.
CANDIDATES: dict[str, dict] = {
    "default": {},
    "atom_msdp2": {"AtomLayoutMSdP": 2},
    "atom_ndkv1": {"AtomLayoutNdKV": 1},
    "atom_mdq1": {"AtomLayoutMdQ": 1},
    "no_sdp_swap_msdp2": {"SdP_swapAB": False, "AtomLayoutMSdP": 2},
    "dkv_swap": {"dKV_swapAB": True},
    "dq_swap": {"dQ_swapAB": True},
    "m64": {"m_block_size": 64, "AtomLayoutMdQ": 1},
    "m64_dq_single_wg": {"m_block_size": 64, "AtomLayoutMdQ": 1, "dQ_single_wg": True},
    "n64": {"n_block_size": 64, "AtomLayoutNdKV": 1},
    "m192_wg3": {"m_block_size": 192, "num_wg": 3, "AtomLayoutNdKV": 3, "AtomLayoutMdQ": 3},
    "q_stage1": {"num_stages_Q": 1, "num_stages_dO": 1, "num_stages_PdS": 1},
}


def time_candidate(name: str, tokens: int, heads: int, head_dim: int, repeats: int) -> dict:
    """Backward time and error of one candidate, in this process."""
    import torch
    import torch.nn.functional as F
    from flash_attn.cute import interface
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.attention import median_seconds

    default = interface._tile_size_bwd_sm90
    config = dataclasses.replace(default(head_dim, head_dim, False, False), **CANDIDATES[name])
    interface._tile_size_bwd_sm90 = lambda *args, **kwargs: config
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                                 generator=generator) for _ in range(4))
    out, lse = interface.flash_attn_func(q, k, v, return_lse=True)
    scale = head_dim ** -0.5

    def backward():
        return interface._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale)[:3]

    grads = backward()
    leaves = [t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(*leaves).backward(dout.transpose(1, 2))
    errors = {f"d{n}_rel_err": float((g - r.grad.transpose(1, 2)).float().norm() / r.grad.float().norm())
              for n, g, r in zip("qkv", grads, leaves)}
    seconds = median_seconds(backward, repeats)
    return {"candidate": name, "config": dataclasses.asdict(config), "backward_ms": round(seconds * 1e3, 3),
            "tflops": round(8 * heads * tokens ** 2 * head_dim / seconds / 1e12, 1), **errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=22000)
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--timeout", type=int, default=90, help="seconds per candidate (compilation included)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one candidate, print its JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_candidate(args.one, args.tokens, args.heads, args.head_dim, args.repeats)))
        return
    rows = []
    for name in args.candidates:
        command = [sys.executable, __file__, "--one", name, "--tokens", str(args.tokens), "--heads", str(args.heads),
                   "--head-dim", str(args.head_dim), "--repeats", str(args.repeats)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "candidate": name, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"candidate": name, "error": f"over {args.timeout} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps({"tokens": args.tokens, "heads": args.heads, "head_dim": args.head_dim,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
