#!/usr/bin/env python3
"""Export the MfM transformer of a checkpoint for serving runtimes.

  pt2          AOTInductor package: load with torch._inductor.aoti_load_package (fp32/bf16/fp16, cpu/cuda)
  onnx         ONNX (dynamo exporter, opset >= 18) for onnxruntime and friends (fp32/fp16)
  safetensors  the official transformer/ folder in bf16 or fp16 (diffusers layout)

The source is a training checkpoint (--checkpoint, raw or EMA weights) or an official or exported
transformer/pipeline folder (--official). pt2 and onnx take every input of the transformer
(latents, timestep, text, text_mask, condition[, motion_score]) and return the velocity; batch,
latent frames (1 = image), height, width and text length are dynamic. Exported in one process:
tensor, pipeline and context parallelism, sequence parallelism, FP8 and Transformer Engine
layers are not part of any export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

from megatron_mfm.export import serving  # noqa: E402
from megatron_mfm.export.official_io import parse_size  # noqa: E402

FORMAT_DTYPES = {"pt2": ("fp32", "bf16", "fp16"), "onnx": ("fp32", "fp16"), "safetensors": ("bf16", "fp16")}


def export(args: argparse.Namespace) -> Path:
    if args.dtype not in FORMAT_DTYPES[args.format]:
        raise ValueError(f"--dtype {args.dtype}: {args.format} export supports {', '.join(FORMAT_DTYPES[args.format])}")
    if args.device == "cuda" and args.format != "pt2":
        raise ValueError(f"--device cuda: only the pt2 export is compiled for a device ({args.format} is device-free)")
    model = serving.build_for_serving(args.checkpoint, args.official, args.weights)
    dtype = serving.SERVING_DTYPES[args.dtype]
    if args.format == "pt2":
        return serving.save_aoti_package(model, args.output, dtype, args.device)
    if args.format == "onnx":
        return serving.save_onnx(model, args.output, dtype, args.opset)
    return serving.save_weights(model, args.output, dtype, args.max_shard_size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mfm-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=sorted(FORMAT_DTYPES), help="what to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="megatron_mfm checkpoint or save directory")
    source.add_argument("--official", help="official/exported transformer/ or pipeline folder")
    parser.add_argument("--output", required=True, help="new .pt2 or .onnx file, or new folder for safetensors")
    parser.add_argument("--weights", default="raw", choices=["raw", "ema"], help="with --checkpoint: raw or EMA weights")
    parser.add_argument("--dtype", default=None, choices=sorted(serving.SERVING_DTYPES),
                        help="pt2: fp32/bf16/fp16, onnx: fp32/fp16, safetensors: bf16/fp16 "
                             "(default fp32, safetensors bf16)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="pt2: device to compile for")
    parser.add_argument("--opset", type=int, default=serving.MIN_ONNX_OPSET, help="onnx: opset (>= 18)")
    parser.add_argument("--max-shard-size", default="5GB", type=parse_size, help="safetensors: largest shard")
    args = parser.parse_args(argv)
    if args.weights == "ema" and args.checkpoint is None:
        parser.error("--weights ema needs --checkpoint (an official folder holds one set of weights)")
    args.dtype = args.dtype or ("bf16" if args.format == "safetensors" else "fp32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        path = export(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ModuleNotFoundError) as error:
        raise SystemExit(f"mfm-export: error: {error}") from None
    print(f"exported {args.checkpoint or args.official} -> {path} ({args.format}, {args.dtype})", flush=True)


if __name__ == "__main__":
    main()
