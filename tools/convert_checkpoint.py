#!/usr/bin/env python3
"""Convert MfM checkpoints between the official diffusers layout and megatron dist checkpoints.

  import-official  official transformer/ folder -> megatron_mfm dist checkpoint (any TP/PP)
  export-official  megatron_mfm dist checkpoint -> official transformer/ or pipeline folder
  reshard          a checkpoint's weights rewritten by ranks of another TP/PP layout
  forward          one forward pass of a checkpoint on saved inputs (the parity check)

Multi-process runs use torchrun (gloo on CPU, NCCL on GPU), e.g.
  torchrun --nproc-per-node 2 tools/convert_checkpoint.py forward --tp 2 --load CKPT ...

Large models convert tensor by tensor: import reads the official safetensors lazily (one file or
an index of shards) straight into each rank's parameters; export converts each tensor as it is
written into safetensors shards of at most --max-shard-size (plus the diffusers index when more
than one), so memory holds the model and at most one shard.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

from megatron_mfm.checkpoint.layout import CheckpointError
from megatron_mfm.checkpoint.model_state import (
    OfficialTensors,
    build_from_checkpoint,
    build_from_official,
    save_model,
)
from megatron_mfm.export.official_io import parse_size, write_official, write_pipeline
from megatron_mfm.model.config import to_official_config
from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel

# Names of the official forward's arguments, as the inputs file must spell them.
FORWARD_INPUTS = (
    "hidden_states",
    "conditional_pixel_values",
    "conditional_masks",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "timestep",
    "motion_score",
)


def _layout(args: argparse.Namespace) -> dict:
    """Megatron config fields of the requested layout."""
    initialize_parallel(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    return dict(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)


def import_official(args: argparse.Namespace) -> None:
    model = build_from_official(args.official, args.backend, **_layout(args))
    save_model(model, args.save)
    _log(f"imported {args.official} -> {args.save} (tp={args.tp}, pp={args.pp})")


def reshard(args: argparse.Namespace) -> None:
    model = build_from_checkpoint(args.load, args.weights, args.backend, **_layout(args))
    save_model(model, args.save)
    _log(f"resharded {args.load} -> {args.save} (tp={args.tp}, pp={args.pp}, {args.weights} weights)")


def export_official(args: argparse.Namespace) -> None:
    initialize_parallel()
    model = build_from_checkpoint(args.load, args.weights)
    config = model.config
    # Converted one tensor at a time while the shards are written: the model is the only full copy.
    tensors = OfficialTensors(model, torch.bfloat16 if args.dtype == "bf16" else None)
    if args.pipeline:
        write_pipeline(args.output, args.pipeline, to_official_config(config), tensors, link=args.link,
                       max_shard_bytes=args.max_shard_size)
    else:
        write_official(args.output, to_official_config(config), tensors, max_shard_bytes=args.max_shard_size)
    _log(f"exported {args.load} -> {args.output} ({len(tensors)} tensors, {args.weights} weights, {args.dtype})")


def forward(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file, save_file

    if Path(args.output).exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it")
    initialize_parallel(tensor_parallel_size=args.tp)
    model = build_from_checkpoint(args.load, "raw", args.backend, tensor_model_parallel_size=args.tp,
                                  sequence_parallel=args.sequence_parallel and args.tp > 1)
    model.eval()
    inputs = load_file(args.inputs)
    unknown = sorted(set(inputs) - set(FORWARD_INPUTS))
    if unknown or "hidden_states" not in inputs:
        raise SystemExit(
            f"{args.inputs}: expected tensors named {FORWARD_INPUTS} (hidden_states required), "
            f"unknown: {unknown}"
        )
    condition = inputs.get("conditional_pixel_values")
    if condition is not None and "conditional_masks" in inputs:
        condition = torch.cat([condition, inputs["conditional_masks"]], dim=1)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    model.to(device)
    with torch.no_grad():
        sample = model(
            latents=to(inputs["hidden_states"]),
            timestep=to(inputs["timestep"]),
            text=to(inputs["encoder_hidden_states"]),
            text_mask=to(inputs.get("encoder_attention_mask")),
            condition=to(condition),
            motion_score=to(inputs.get("motion_score")),
        )
    if torch.distributed.get_rank() == 0:
        save_file({"sample": sample.float().cpu().contiguous()}, args.output)
    _log(f"forward of {args.load} on {args.inputs} -> {args.output} (tp={args.tp})")


def _log(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(message, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-official", help="official transformer/ folder -> dist checkpoint")
    p.add_argument("--official", required=True,
                   help="transformer/ folder (config.json + diffusion_pytorch_model*.safetensors) or a pipeline folder")
    p.add_argument("--save", required=True, help="new checkpoint directory (must not exist)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the writing ranks (run with torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the writing ranks")
    p.add_argument("--backend", default="local", choices=["auto", "te", "local"], help="layer spec used to build the model")
    p.set_defaults(run=import_official)

    p = sub.add_parser("reshard", help="rewrite a checkpoint's model (or EMA) weights from ranks of another TP/PP layout")
    p.add_argument("--load", required=True, help="checkpoint (training or model-only) or save directory")
    p.add_argument("--save", required=True, help="new model-only checkpoint directory (must not exist)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size = tp * pp under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--weights", default="raw", choices=["raw", "ema"], help="raw weights or the EMA of a training checkpoint")
    p.add_argument("--backend", default="local", choices=["auto", "te", "local"], help="layer spec used to build the model")
    p.set_defaults(run=reshard)

    p = sub.add_parser("export-official", help="dist checkpoint -> official transformer/ folder")
    p.add_argument("--load", required=True, help="megatron_mfm checkpoint directory")
    p.add_argument("--output", required=True, help="new folder for config.json + safetensors (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the written tensors")
    p.add_argument("--weights", default="raw", choices=["raw", "ema"], help="raw weights or the EMA of a training checkpoint")
    p.add_argument("--pipeline", help="official pipeline folder whose other components (vae, text_encoder, "
                   "tokenizer, scheduler, model_index.json) join the export; --output is then a pipeline folder")
    p.add_argument("--link", action="store_true", help="symlink the --pipeline components instead of copying them")
    p.add_argument("--max-shard-size", default="5GB", type=parse_size,
                   help="largest safetensors shard (e.g. 5GB, 500MB); more than one shard adds the diffusers index")
    p.set_defaults(run=export_official)

    p = sub.add_parser("forward", help="one forward pass on inputs named as the official forward's arguments")
    p.add_argument("--load", required=True, help="megatron_mfm checkpoint directory")
    p.add_argument("--inputs", required=True, help=f"safetensors with {', '.join(FORWARD_INPUTS)}")
    p.add_argument("--output", required=True, help="safetensors file to write ('sample'); must not exist")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size under torchrun)")
    p.add_argument("--sequence-parallel", action="store_true", help="also split tokens across TP ranks")
    p.add_argument("--backend", default="auto", choices=["auto", "te", "local"], help="layer spec")
    p.set_defaults(run=forward)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, FileExistsError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
