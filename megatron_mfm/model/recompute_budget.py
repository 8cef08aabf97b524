"""``model.recompute=auto``: recompute the fewest blocks whose activations do not fit.

Measured, not modelled. The first two training steps run block 0 without recompute and every
other block recomputed. The first records what block 0 keeps from its forward until its backward
(its saved activations and output). The second, with the optimizer state now allocated, gives
the peak of a whole step that recomputes N - 1 of the N blocks, read from the allocator: weights,
gradients, optimizer state, batch, the backward's transients (a recomputed block's rebuilt
activations, attention workspaces) and the optimizer step's are all in it. Keeping a block instead
of recomputing it adds what it keeps less its input (all a recomputed block keeps), so

    peak(n) = peak(N - 1) + (N - 1 - n) * (kept - input)

After the second optimizer step (the training step calls ``after_optimizer_step``) the fewest n
whose peak fits the budget are recomputed for the rest of the run. Every rank takes the largest
measurement of all ranks, so all recompute the same blocks: a recomputed block re-runs its
context- and tensor-parallel collectives in backward, which must line up across ranks.
``benchmarks/gpu/issue16.sh`` checks the prediction against the measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

MEMORY_FRACTION = 0.92
"""Share of the GPU's memory the predicted peak may fill (the rest: allocator fragmentation and
what the allocator does not see: NCCL buffers, cuBLAS and cuDNN workspaces)."""

MEASURED_STEPS = 2
"""Steps run with block 0 kept and the rest recomputed: the first measures the block, the second
the peak of a step with the optimizer state allocated."""


@dataclass(frozen=True)
class BlockMemory:
    """Bytes one block holds from its forward until its backward."""

    kept: int
    """Without recompute: saved activations and output."""
    input: int
    """With recompute: its input only."""


def predicted_peak(num_blocks: int, recomputed: int, block: BlockMemory, measured_peak: int) -> int:
    """Peak bytes of a step that recomputes the first ``recomputed`` of ``num_blocks`` blocks,
    from ``measured_peak``, the peak of a step that recomputed all but one."""
    return measured_peak + (num_blocks - 1 - recomputed) * (block.kept - block.input)


def blocks_to_recompute(num_blocks: int, block: BlockMemory, measured_peak: int, budget: int) -> int:
    """The fewest blocks to recompute for the predicted peak to fit ``budget``; all of them when
    even that does not fit (the step may then run out of memory, as full recompute would)."""
    for recomputed in range(num_blocks + 1):
        if predicted_peak(num_blocks, recomputed, block, measured_peak) <= budget:
            return recomputed
    return num_blocks


def largest_over_ranks(*values: int) -> list[int]:
    """Each value's maximum over all ranks (the values themselves in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class AutoRecompute:
    """The per-model state of ``recompute=auto``: measure (first two training steps), then a
    fixed number of recomputed blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.block: BlockMemory | None = None
        self.measured_steps = 0
        self.recomputed: int | None = None
        self.decision: dict = {}

    def recomputes(self, index: int) -> bool:
        """Whether block ``index`` is recomputed in this training forward."""
        if self.recomputed is not None:
            return index < self.recomputed
        return index > 0  # measuring: block 0 keeps its activations, the rest are recomputed

    def measure(self, run_block, x: torch.Tensor) -> torch.Tensor:
        """Run block 0 (``run_block(x)``), recording what it keeps the first time."""
        if self.block is not None:
            return run_block(x)
        before = torch.cuda.memory_allocated()
        out = run_block(x)
        self.block = BlockMemory(kept=torch.cuda.memory_allocated() - before, input=x.numel() * x.element_size())
        return out

    def after_optimizer_step(self) -> dict | None:
        """After the first step, start reading the peak; after the second, decide (and return the
        decision)."""
        if self.recomputed is not None or self.block is None:
            return None
        self.measured_steps += 1
        if self.measured_steps < MEASURED_STEPS:
            torch.cuda.reset_peak_memory_stats()
            return None
        return self.decide(torch.cuda.max_memory_allocated())

    def decide(self, measured_peak: int) -> dict:
        """Pick the number of recomputed blocks from the measured block and peak."""
        kept, input_bytes, measured_peak = largest_over_ranks(self.block.kept, self.block.input, measured_peak)
        block = BlockMemory(kept=kept, input=input_bytes)
        budget = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory * MEMORY_FRACTION)
        self.recomputed = blocks_to_recompute(self.num_blocks, block, measured_peak, budget)
        self.decision = dict(recomputed_blocks=self.recomputed, blocks=self.num_blocks, kept_bytes=kept,
                             input_bytes=input_bytes, measured_peak_bytes=measured_peak, budget_bytes=budget,
                             predicted_peak_bytes=predicted_peak(self.num_blocks, self.recomputed, block, measured_peak))
        return self.decision


def describe(decision: dict) -> str:
    """The decision as one log line."""
    gib = {key: value / 2**30 for key, value in decision.items() if key.endswith("_bytes")}
    return (f"recompute=auto: {decision['recomputed_blocks']} of {decision['blocks']} blocks recomputed, predicted "
            f"peak {gib['predicted_peak_bytes']:.1f} GiB of a {gib['budget_bytes']:.1f} GiB budget (a block keeps "
            f"{gib['kept_bytes']:.2f} GiB, its input {gib['input_bytes']:.2f}; measured peak with "
            f"{decision['blocks'] - 1} recomputed {gib['measured_peak_bytes']:.1f} GiB)")


def after_optimizer_step(model_chunks) -> list[dict]:
    """Call after each optimizer step: lets ``recompute=auto`` chunks measure and decide; returns
    the decisions made in this call."""
    decisions = []
    for chunk in model_chunks:
        auto = getattr(chunk, "auto_recompute", None)
        decision = auto.after_optimizer_step() if auto is not None else None
        if decision:
            decisions.append(decision)
    return decisions
