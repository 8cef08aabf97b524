#!/usr/bin/env python3
"""Packed against bucketed micro-batches on a mixed image + video stage (one process).

A seeded mix of samples from several buckets (images and clips) is cut into micro-batches two
ways: bucketed, as many samples of one bucket as fit the token budget (the planner's rule), and
packed by ``data.packing`` (first fit by tokens). For each: the padding fraction (the share of
the micro-batches' token budget no sample fills) and tokens/s of forward + backward over all micro-batches with the active attention backend (GPU:
FA4 varlen or TE THD for packs; CPU: SDPA with block masks). Writes JSON.

  CPU smoke:  python benchmarks/packing.py --preset tiny --buckets 1x32x32 1x64x64 5x32x32 9x64x64 \
                  --token-budget 128 --samples 12 --repeats 1 --output /tmp/packing.json
  GPU:        python benchmarks/packing.py --preset mfm-2b --layers 4 --precision bf16 --output packing.json

The real tokens are the same both ways and no micro-batch computes padding (a bucketed one is
just shorter), so packing can win only by running fewer, larger micro-batches.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from benchmarks.timing import TEXT_TOKENS, timed
from megatron_mfm.config import load_config
from megatron_mfm.data.packing import first_fit
from megatron_mfm.data.shards.buckets import Bucket, samples_per_micro_batch
from megatron_mfm.diffusion.flow_matching import per_sample_mse
from megatron_mfm.model.dit import MfMDiT, build_model
from megatron_mfm.model.geometry import latent_shape
from megatron_mfm.parallel.initialize import initialize_parallel
from megatron_mfm.training.components import layer_spec_for

GPU_BUCKETS = ["1x256x256", "1x512x512", "1x512x768", "17x256x256", "33x512x512", "49x352x640"]


def draw_samples(buckets: list[Bucket], count: int, image_fraction: float, seed: int) -> list[Bucket]:
    """``count`` samples' buckets: images with ``image_fraction``, each kind's buckets uniformly."""
    rng = random.Random(seed)
    images, clips = [b for b in buckets if b.frames == 1], [b for b in buckets if b.frames > 1]
    return [rng.choice(images if (rng.random() < image_fraction and images) or not clips else clips)
            for _ in range(count)]


def bucketed(samples: list[Bucket], budget: int) -> list[list[Bucket]]:
    """Micro-batches of one bucket each, ``samples_per_micro_batch`` samples (the last of a
    bucket may hold fewer)."""
    batches = []
    for bucket in sorted(set(samples)):
        same = [s for s in samples if s == bucket]
        size = samples_per_micro_batch(bucket, budget, 1)
        batches.extend(same[i:i + size] for i in range(0, len(same), size))
    return batches


def packed(samples: list[Bucket], budget: int) -> list[list[Bucket]]:
    return [[samples[i] for i in sorted(members)] for members in first_fit([s.tokens for s in samples], budget)]


def model_inputs(model: MfMDiT, batch: list[Bucket], pack: bool, device, dtype) -> tuple[dict, list]:
    """Random model inputs of one micro-batch (a list of groups when packed) and targets."""
    config = model.config
    groups = {}
    for bucket in batch:
        groups[bucket] = groups.get(bucket, 0) + 1

    def normal(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    latents, conditions = [], []
    for bucket, count in groups.items():
        latents.append(normal(count, *latent_shape(bucket.frames, bucket.height, bucket.width)))
        conditions.append(normal(count, config.condition_channels, bucket.frames, bucket.height, bucket.width))
    n = len(batch)
    inputs = dict(latents=latents if pack else latents[0], timestep=torch.rand(n, device=device) * 1000,
                  text=normal(n, TEXT_TOKENS, config.text_hidden_size), text_mask=torch.ones(n, TEXT_TOKENS, device=device),
                  condition=conditions if pack else conditions[0], motion_score=torch.full((n,), 5.0, device=device))
    return inputs, [torch.randn_like(g) for g in latents]


def padding_fraction(batches: list[list[Bucket]], budget: int) -> float:
    """Share of the micro-batches' token budget that no sample fills (a micro-batch over the
    budget, a single large sample, counts its own tokens): what a fixed-size batch pads."""
    real = sum(b.tokens for batch in batches for b in batch)
    return 1.0 - real / sum(max(budget, sum(b.tokens for b in batch)) for batch in batches)


def measure(model: MfMDiT, batches: list[list[Bucket]], pack: bool, repeats: int, device, dtype) -> float:
    """Median seconds of forward + backward over every micro-batch."""
    prepared = [model_inputs(model, batch, pack, device, dtype) for batch in batches]

    def step():
        for inputs, targets in prepared:
            out = model(**inputs)
            outs = out if pack else [out]
            sum(per_sample_mse(o, t).sum() for o, t in zip(outs, targets)).backward()

    return timed(step, repeats, warmup=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mfm-2b")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers (0: the preset's)")
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--glue", choices=("eager", "compiled"), default="compiled" if torch.cuda.is_available() else "eager",
                        help="model.compile_glue (default: compiled on a GPU, as training runs)")
    parser.add_argument("--buckets", nargs="+", default=GPU_BUCKETS, help="FRAMESxHEIGHTxWIDTH each")
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--image-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = [f"model.preset={args.preset}", f"train.precision={args.precision}",
                 f"model.attention_backend={args.attention_backend}", f"model.compile_glue={args.glue == 'compiled'}"]
    if args.layers:
        overrides.append(f"model.num_layers={args.layers}")
    config = load_config(overrides=overrides)
    initialize_parallel(seed=args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config.to_model_config(), layer_spec_for(config)).to(device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    samples = draw_samples([Bucket.parse(b) for b in args.buckets], args.samples, args.image_fraction, args.seed)
    real_tokens = sum(s.tokens for s in samples)
    result = {"preset": args.preset, "layers": config.to_model_config().num_layers, "precision": args.precision,
              "glue": args.glue, "attention_backend": args.attention_backend,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "token_budget": args.token_budget, "samples": len(samples), "tokens": real_tokens,
              "buckets": sorted({s.name for s in samples})}
    for name, pack, batches in (("bucketed", False, bucketed(samples, args.token_budget)),
                                ("packed", True, packed(samples, args.token_budget))):
        seconds = measure(model, batches, pack, args.repeats, device, dtype)
        result[name] = {"micro_batches": len(batches),
                        "padding_fraction": round(padding_fraction(batches, args.token_budget), 4),
                        "seconds": round(seconds, 4),
            "tokens_per_second": round(real_tokens / seconds, 1)}
    result["speedup"] = round(result["packed"]["tokens_per_second"] / result["bucketed"]["tokens_per_second"], 3)
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
