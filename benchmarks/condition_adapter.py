#!/usr/bin/env python3
"""The condition adapter's forward + backward in NCHW and channels-last, side by side, and
channels-last with cuDNN's autotuner (``torch.backends.cudnn.benchmark``: each shape's
convolution algorithms timed on first use instead of picked by heuristics).

The adapter runs its first convolutions at full pixel resolution (MfM-2B at 97 x 352 x 640: 16
channels x 22M pixels); in NCHW cuDNN wraps each in layout transposes. Same weights and input
for both layouts; the rows give the median time and the output's and gradients' relative
difference to NCHW. On a CPU only the ratio means anything.

  python benchmarks/condition_adapter.py --frames 97 --height 352 --width 640 --output adapter.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import timed  # noqa: E402
from megatron_mfm.model.config import preset_config  # noqa: E402
from megatron_mfm.model.embeddings import ConditionAdapter  # noqa: E402
from megatron_mfm.model.presets import PRESETS  # noqa: E402


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mfm-2b", choices=sorted(PRESETS))
    parser.add_argument("--frames", type=int, default=97)
    parser.add_argument("--height", type=int, default=352)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = preset_config(args.preset)
    generator = torch.Generator().manual_seed(0)
    condition = torch.randn(args.batch, config.condition_channels, args.frames, args.height, args.width,
                            generator=generator).to(device, dtype)
    adapters = {layout: ConditionAdapter(config.condition_channels, config.hidden_size,
                                         channels_last=layout != "nchw").to(device, dtype)
                for layout in ("nchw", "channels_last", "channels_last_autotuned")}
    for adapter in adapters.values():
        adapter.load_state_dict(adapters["nchw"].state_dict())
    grad = None
    results = {}
    autotuner = torch.backends.cudnn.benchmark
    for layout, adapter in adapters.items():
        torch.backends.cudnn.benchmark = layout.endswith("autotuned")
        output = adapter(condition)
        grad = torch.randn(output.shape, generator=generator).to(device, dtype) if grad is None else grad

        def step(adapter=adapter):
            adapter.zero_grad(set_to_none=True)
            adapter(condition).backward(grad)

        seconds = timed(step, args.iterations, 2)
        results[layout] = (seconds, adapter(condition).detach(), [p.grad for p in adapter.parameters()])
    torch.backends.cudnn.benchmark = autotuner
    reference_output, reference_grads = results["nchw"][1:]
    rows = [{"layout": layout, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
             "shape": [args.batch, config.condition_channels, args.frames, args.height, args.width],
             "dtype": str(dtype), "fwd_bwd_ms": seconds * 1e3,
             "speedup_vs_nchw": results["nchw"][0] / seconds,
             "output_rel_diff": relative_difference(output, reference_output),
             "max_grad_rel_diff": max(relative_difference(g, r) for g, r in zip(grads, reference_grads))}
            for layout, (seconds, output, grads) in results.items()]
    for row in rows:
        print(f"{row['layout']:>14s}: {row['fwd_bwd_ms']:8.2f} ms ({row['speedup_vs_nchw']:.2f}x), output "
              f"{row['output_rel_diff']:.1e}, gradients {row['max_grad_rel_diff']:.1e} relative to NCHW")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
