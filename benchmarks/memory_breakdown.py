#!/usr/bin/env python3
"""Where a training step's GPU memory goes (GPU only), as JSON.

One real training step (megatron schedule, DDP, optimizer) warms up and allocates the optimizer
state; the second is measured:
- static: parameters, gradient buffers, and the rest allocated before the forward (optimizer
  state and fp32 master weights, workspaces);
- per block: memory kept from its forward to its backward (allocator delta) and the tensors
  autograd saved for it, by dtype and shape (unique storages; fp32 ones are the glue's copies);
- at the end of the forward (the step's peak region): live memory grouped by the first project,
  Transformer Engine or megatron source line that allocated it (torch's allocation history);
- the step's peak.

  python benchmarks/memory_breakdown.py --preset mfm-2b --frames 97 --height 352 --width 640 \\
      --set model.compile_glue=true --output runs/memory.json
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from benchmarks.profile_row import random_batch, velocity_loss
from megatron_mfm.config import load_config
from megatron_mfm.parallel.initialize import destroy_parallel
from megatron_mfm.training.loop import setup
from megatron_mfm.training.optimizer_step import apply_update, prepare_update
from megatron_mfm.utils.atomic import atomic_write_text

GIB = 2**30
SOURCES = ("megatron_mfm", "transformer_engine", "megatron/core", "flash_attn")


class SavedTensorLedger:
    """Bytes of the tensors autograd saves, per block (set by forward pre-hooks), by dtype and shape."""

    def __init__(self, blocks: torch.nn.ModuleList):
        self.block = "outside blocks"
        self.seen: set[int] = set()
        self.saved = collections.defaultdict(collections.Counter)
        self.kept: dict[str, int] = {}
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(self._enter(f"block {index}"))
            block.register_forward_hook(self._leave(f"block {index}"))

    def _enter(self, name: str):
        def hook(module, args):
            self.block = name
            self.kept[name] = -torch.cuda.memory_allocated()
        return hook

    def _leave(self, name: str):
        def hook(module, args, output):
            self.kept[name] += torch.cuda.memory_allocated()
            self.block = "outside blocks"
        return hook

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if tensor.is_cuda and storage.data_ptr() not in self.seen and not isinstance(tensor, torch.nn.Parameter):
            self.seen.add(storage.data_ptr())
            self.saved[self.block][f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"] += storage.nbytes()
        return tensor

    def report(self) -> dict:
        blocks = {}
        for name, counter in self.saved.items():
            by_dtype = collections.Counter()
            for key, nbytes in counter.items():
                by_dtype[key.split()[0]] += nbytes
            blocks[name] = {"saved_gib": sum(counter.values()) / GIB, "kept_gib": self.kept.get(name, 0) / GIB,
                            "saved_by_dtype_gib": {k: v / GIB for k, v in by_dtype.items()},
                            "largest_saved": [{"tensor": k, "gib": v / GIB} for k, v in counter.most_common(12)]}
        return blocks


def live_memory_by_source(top: int = 30) -> list[dict]:
    """Active allocations grouped by the first frame in our, TE's or megatron's code."""
    totals = collections.Counter()
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = block.get("frames", [])
            where = next((f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}" for f in frames
                          if any(s in f["filename"] for s in SOURCES)), "other (no project frame)")
            totals[where] += block["size"]
    return [{"allocated_by": k, "gib": v / GIB} for k, v in totals.most_common(top)]


def breakdown(args) -> dict:
    trainer = setup(load_config(overrides=[f"model.preset={args.preset}", f"train.precision={args.precision}",
                                           "train.micro_batch_size=1", "train.global_batch_size=1",
                                           "train.ema_decay=0", "checkpoint.save=", "logging.tensorboard_dir=",
                                           *args.set]))
    batch, target = random_batch(trainer.model_config, args.frames, args.height, args.width, 1, trainer.device,
                                 trainer.dtype, trainer.config.train.seed)
    model = trainer.model[0]
    ledger = SavedTensorLedger(model.layers)

    def step():
        for chunk in trainer.ddp:
            chunk.zero_grad_buffer()
        trainer.optimizer.zero_grad()

        def forward_step(data_iterator, ddp_model):
            output = ddp_model(**next(data_iterator))
            result["live_at_end_of_forward"] = live_memory_by_source() if recording else []
            result["allocated_at_end_of_forward_gib"] = torch.cuda.memory_allocated() / GIB
            return output, lambda out: velocity_loss(out, target)

        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=trainer.ddp,
                                    num_microbatches=1, seq_length=1, micro_batch_size=1, forward_only=False)
        apply_update(trainer.optimizer, prepare_update(trainer.optimizer).item())

    result, recording = {}, False
    step()  # allocates the optimizer state; compiles
    torch.cuda.synchronize()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for chunk in trainer.ddp for b in chunk.buffers)
    before = torch.cuda.memory_allocated()
    result["static_gib"] = {"parameters": params / GIB, "gradient_buffers": grads / GIB,
                            "optimizer_state_master_weights_and_rest": (before - params - grads) / GIB,
                            "total": before / GIB}
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    recording = True
    with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda tensor: tensor):
        step()
    torch.cuda.memory._record_memory_history(enabled=None)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    result["blocks"] = ledger.report()
    kept = [b["kept_gib"] for name, b in result["blocks"].items() if name.startswith("block")]
    result["blocks_total_kept_gib"] = sum(kept)
    result["setup"] = vars(args) | {"device": torch.cuda.get_device_name()}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mfm-2b")
    parser.add_argument("--frames", type=int, default=97)
    parser.add_argument("--height", type=int, default=352)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp8"])
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE", help="config overrides")
    parser.add_argument("--output", type=Path, default=None, help="JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a GPU (it reads the CUDA allocator)")
    try:
        result = breakdown(args)
    finally:
        destroy_parallel()
    text = json.dumps(result, indent=2, default=str)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(json.dumps({k: result[k] for k in ("static_gib", "peak_gib", "blocks_total_kept_gib")}, indent=2))
    print(json.dumps(result["blocks"].get("block 0", {}), indent=2))
    print(json.dumps(result.get("live_at_end_of_forward", [])[:15], indent=2))
    return result


if __name__ == "__main__":
    main()
