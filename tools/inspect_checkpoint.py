#!/usr/bin/env python3
"""Inspect a megatron_mfm checkpoint, or diff two.

  python tools/inspect_checkpoint.py CKPT                 # summary + per-tensor shape/dtype/norm
  python tools/inspect_checkpoint.py CKPT --diff OTHER    # tensors that differ, by relative norm

CKPT is a checkpoint directory (iter_XXXXXXX or a converted model) or a save directory with a
``latest`` file. Runs in one process; tensors are loaded whole, one checkpoint at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import load_plain_tensors

from megatron_mfm.checkpoint.layout import (
    CONFIG_FILE,
    EMA_PREFIX,
    TRAINING_STATE_PREFIXES,
    is_complete,
    resolve_checkpoint,
)
from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel


def resolve(path: str) -> Path:
    """A checkpoint directory from a checkpoint or a save directory."""
    path = resolve_checkpoint(path)
    if not is_complete(path):
        raise SystemExit(f"{path}: not a checkpoint (no metadata.json) nor a save directory (no latest)")
    return path


def summary(path: Path) -> dict:
    """Iteration, config, layout and data state from the checkpoint's common state."""
    info: dict = {"path": str(path)}
    if (path / CONFIG_FILE).is_file():
        info["architecture"] = json.loads((path / CONFIG_FILE).read_text())
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception:  # model-only checkpoints written by the converter have no common state
        common = {}
    for key in ("iteration", "data", "training"):
        if key in common:
            info[key] = common[key]
    run = common.get("run_config")
    if run:
        info["parallel layout"] = run.get("parallel")
        info["train"] = {k: run["train"][k] for k in ("iterations", "global_batch_size", "micro_batch_size", "precision")}
    return info


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_plain_tensors(str(path)).items() if torch.is_tensor(v)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint or save directory")
    parser.add_argument("--diff", help="a second checkpoint to compare against")
    parser.add_argument("--all", action="store_true", help="also list optimizer and EMA tensors")
    args = parser.parse_args()

    initialize_parallel()
    try:
        path = resolve(args.checkpoint)
        info = summary(path)
        state = tensors(path)
        model = {k: v for k, v in state.items() if not k.startswith(TRAINING_STATE_PREFIXES)}
        info["parameters"] = sum(v.numel() for v in model.values())
        info["has EMA"] = any(k.startswith(EMA_PREFIX) for k in state)
        print(json.dumps(info, indent=2, default=str))
        shown = state if args.all else model
        if not args.diff:
            print(f"\n{'tensor':70s} {'shape':>22s} {'dtype':>10s} {'norm':>12s}")
            for key in sorted(shown):
                v = shown[key]
                print(f"{key:70s} {str(tuple(v.shape)):>22s} {str(v.dtype)[6:]:>10s} {v.float().norm().item():12.5g}")
            return
        other = tensors(resolve(args.diff))
        only_a, only_b = sorted(set(shown) - set(other)), sorted(set(other) & set(state) - set(shown))
        differing = 0
        print(f"\n{'tensor':70s} {'relative difference':>20s}")
        for key in sorted(set(shown) & set(other)):
            a, b = shown[key].float(), other[key].float()
            if a.shape != b.shape:
                print(f"{key:70s} shape {tuple(a.shape)} vs {tuple(b.shape)}")
                differing += 1
            elif not torch.equal(a, b):
                print(f"{key:70s} {((a - b).norm() / a.norm().clamp_min(1e-30)).item():20.3e}")
                differing += 1
        for key in only_a:
            print(f"{key:70s} only in {args.checkpoint}")
        for key in sorted(set(other) - set(state)):
            print(f"{key:70s} only in {args.diff}")
        print(f"\n{differing} of {len(set(shown) & set(other))} common tensors differ; "
              f"{len(only_a) + len(only_b)} present in one checkpoint only")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
