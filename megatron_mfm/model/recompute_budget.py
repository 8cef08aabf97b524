"""``model.recompute=auto``: recompute the fewest blocks whose activations do not fit.

Measured, not guessed: on the first training forward block 0 runs without recompute and the
memory it keeps until backward (its saved activations and output) is read from the allocator;
every other block is recomputed until the optimizer has stepped once. After that step (the
training step calls ``after_optimizer_step``), with the optimizer state allocated, the model below
picks how many of the first blocks to recompute for the rest
of the run:

    peak(n) = base + (N - n) * kept + n * input + transient,   transient = kept

base: memory at the start of the forward (weights, gradients, optimizer state, batch); kept: one
block's kept memory; input: what a recomputed block keeps (its input tokens); transient: the
backward of one block (activation gradients, or a recomputed block's rebuilt activations), taken
as one block's kept memory. ``benchmarks/gpu/issue16.sh`` checks the
prediction against the measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEMORY_FRACTION = 0.92
"""Share of the GPU's memory the prediction may fill (the rest: allocator fragmentation, NCCL,
workspaces the model leaves out)."""


@dataclass(frozen=True)
class BlockMemory:
    """Bytes one block holds from its forward until its backward."""

    kept: int
    """Without recompute: saved activations and output."""
    input: int
    """With recompute: its input only."""


def predicted_peak(num_blocks: int, recomputed: int, block: BlockMemory, base: int) -> int:
    """Peak bytes of a step that recomputes the first ``recomputed`` of ``num_blocks`` blocks."""
    return base + (num_blocks - recomputed + 1) * block.kept + recomputed * block.input


def blocks_to_recompute(num_blocks: int, block: BlockMemory, base: int, budget: int) -> int:
    """The fewest blocks to recompute for the predicted peak to fit ``budget``; all of them when
    even that does not fit (the step may then run out of memory, as full recompute would)."""
    for recomputed in range(num_blocks + 1):
        if predicted_peak(num_blocks, recomputed, block, base) <= budget:
            return recomputed
    return num_blocks


class AutoRecompute:
    """The per-model state of ``recompute=auto``: measure (first training forward), decide
    (second), then a fixed number of recomputed blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.block: BlockMemory | None = None
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

    def after_optimizer_step(self) -> None:
        """Decide, once: the block was measured and the optimizer state now exists."""
        if self.recomputed is None and self.block is not None:
            self.decide()

    def decide(self) -> None:
        """Pick the number of recomputed blocks from the measured block and the memory now."""
        base = torch.cuda.memory_allocated()
        budget = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory * MEMORY_FRACTION)
        self.recomputed = blocks_to_recompute(self.num_blocks, self.block, base, budget)
        self.decision = dict(recomputed_blocks=self.recomputed, blocks=self.num_blocks, kept_bytes=self.block.kept,
                             input_bytes=self.block.input, base_bytes=base, budget_bytes=budget,
                             predicted_peak_bytes=predicted_peak(self.num_blocks, self.recomputed, self.block, base))


def after_optimizer_step(model_chunks) -> None:
    """Call after each optimizer step: lets ``recompute=auto`` chunks decide after the first."""
    for chunk in model_chunks:
        auto = getattr(chunk, "auto_recompute", None)
        if auto is not None:
            auto.after_optimizer_step()
