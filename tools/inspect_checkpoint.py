#!/usr/bin/env python3
"""Inspect a megatron_mfm checkpoint, or diff two.

  python tools/inspect_checkpoint.py CKPT                 # summary + per-tensor shape/dtype/norm
  python tools/inspect_checkpoint.py CKPT --diff OTHER    # tensors that differ, by relative norm

CKPT is a checkpoint directory (iter_XXXXXXX or a converted model) or a save directory with a
``latest`` file. Runs in one process; the model's tensors (with --all also the optimizer's and the
EMA's) are loaded whole, one checkpoint at a time.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

from megatron.core import dist_checkpointing

from megatron_mfm.checkpoint.layout import (
    CONFIG_FILE,
    EMA_PREFIX,
    TRAINING_STATE_PREFIXES,
    CheckpointError,
    is_complete,
    resolve_checkpoint,
)
from megatron_mfm.checkpoint.verify import read_common, verify_checkpoint
from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel
from megatron_mfm.parallel.mcore_version import load_dist_checkpoint


def resolve(path: str) -> Path:
    """A checkpoint directory from a checkpoint or a save directory."""
    path = resolve_checkpoint(path)
    if not is_complete(path):
        raise SystemExit(f"{path}: not a checkpoint (no metadata.json) nor a save directory (no latest)")
    verify_checkpoint(path)
    return path


def summary(path: Path) -> dict:
    """Iteration, config, layout and data state from the checkpoint's common state."""
    info: dict = {"path": str(path)}
    if (path / CONFIG_FILE).is_file():
        info["architecture"] = json.loads((path / CONFIG_FILE).read_text())
    common = read_common(path)  # {} for model-only checkpoints written by the converter
    for key in ("iteration", "data", "training"):
        if key in common:
            info[key] = common[key]
    run = common.get("run_config")
    if run:
        info["parallel layout"] = run.get("parallel")
        info["train"] = {k: run["train"][k] for k in ("iterations", "global_batch_size", "micro_batch_size", "precision")}
    return info


def tensors(path: Path, everything: bool) -> dict[str, torch.Tensor]:
    """The model's whole tensors, with ``everything`` also the optimizer's and the EMA's."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    wanted = {k: sh for k, sh in saved.items() if everything or not k.startswith(TRAINING_STATE_PREFIXES)}
    loaded = load_dist_checkpoint(wanted, path, validate_access_integrity=False)
    return {k: v for k, v in loaded.items() if k in wanted}  # load() adds the common state


def report(args: argparse.Namespace) -> None:
    path = resolve(args.checkpoint)
    info = summary(path)
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    info["parameters"] = sum(math.prod(sh.global_shape) for k, sh in saved.items()
                             if not k.startswith(TRAINING_STATE_PREFIXES))
    info["has EMA"] = any(k.startswith(EMA_PREFIX) for k in saved)
    print(json.dumps(info, indent=2, default=str))
    shown = tensors(path, args.all)
    if args.diff:
        diff(shown, tensors(resolve(args.diff), args.all), args)
        return
    print(f"\n{'tensor':70s} {'shape':>22s} {'dtype':>10s} {'norm':>12s}")
    for key in sorted(shown):
        v = shown[key]
        print(f"{key:70s} {str(tuple(v.shape)):>22s} {str(v.dtype)[6:]:>10s} {v.float().norm().item():12.5g}")


def diff(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    """Print the tensors that differ and those present in one checkpoint only."""
    common = sorted(set(first) & set(second))
    differing = 0
    print(f"\n{'tensor':70s} {'relative difference':>20s}")
    for key in common:
        a, b = first[key].float(), second[key].float()
        if a.shape != b.shape:
            print(f"{key:70s} shape {tuple(a.shape)} vs {tuple(b.shape)}")
            differing += 1
        elif not torch.equal(a, b):
            print(f"{key:70s} {((a - b).norm() / a.norm().clamp_min(1e-30)).item():20.3e}")
            differing += 1
    only = [(key, args.checkpoint) for key in sorted(set(first) - set(second))]
    only += [(key, args.diff) for key in sorted(set(second) - set(first))]
    for key, where in only:
        print(f"{key:70s} only in {where}")
    print(f"\n{differing} of {len(common)} common tensors differ; {len(only)} present in one checkpoint only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint or save directory")
    parser.add_argument("--diff", help="a second checkpoint to compare against")
    parser.add_argument("--all", action="store_true", help="also list optimizer and EMA tensors")
    args = parser.parse_args()

    initialize_parallel()
    try:
        report(args)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
