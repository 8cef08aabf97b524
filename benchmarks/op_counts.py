"""Would-be kernel launches of one training step, by phase, counted on the real code paths.

Each aten operator that reaches the dispatcher below autograd is one kernel on a GPU (views,
allocations and scalar reads launch none); a launch-bound GPU step costs ~5-10 us of host time
per kernel. Counted with a ``TorchDispatchMode``, so operators inside C++ extensions that bypass
the dispatcher (Transformer Engine's, fused optimizers') are not seen: exact for
``model.backend=local`` on the CPU, a lower bound elsewhere. Phases are labelled by wrapping the
step's parts for the counted step only (nothing of the trainer is changed afterwards).
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Callable, Iterator

import megatron.core.pipeline_parallel.schedules as megatron_schedules
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mfm.training import loop, step

NO_KERNEL = frozenset({
    "view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "select",
    "slice", "detach", "alias", "split", "split_with_sizes", "_unsafe_split_with_sizes", "chunk", "unbind",
    "narrow", "diagonal", "unfold", "view_as_real", "view_as_complex", "_reshape_alias", "lift_fresh", "empty",
    "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "resize_", "is_same_size",
    "_has_compatible_shallow_copy_type", "_local_scalar_dense",
})
"""Operators that launch no kernel (views, allocations; ``_local_scalar_dense`` is a host read)."""

STEP_PARTS = ("_latents", "_text", "_condition", "noise_and_sigma", "add_noise", "_loss")
"""``training/step.py`` functions a micro-batch's forward step calls, each its own phase."""


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching operators under the innermost label of ``self.labels``."""

    def __init__(self):
        super().__init__()
        self.labels = ["other"]
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ not in NO_KERNEL:
            self.counts[self.labels[-1]] += 1
        return func(*args, **(kwargs or {}))

    def labelled(self, label: str, work: Callable) -> Callable:
        """``work`` with its operators counted under ``label``."""

        @functools.wraps(work)
        def run(*args, **kwargs):
            self.labels.append(label)
            try:
                return work(*args, **kwargs)
            finally:
                self.labels.pop()

        return run


_ABSENT = object()


@contextlib.contextmanager
def _patched(target: object, name: str, value: object) -> Iterator[None]:
    """``target.name`` is ``value`` inside; after, as it was (an instance's own attribute or not)."""
    own = vars(target).get(name, _ABSENT)
    setattr(target, name, value)
    try:
        yield
    finally:
        if own is _ABSENT:
            delattr(target, name)
        else:
            setattr(target, name, own)


def _phases(counter: KernelCounter, trainer: loop.Trainer) -> contextlib.ExitStack:
    """Label the step's parts: data, each step.py part, the model's modules (blocks together),
    backward, the loss reduction and finite check, the optimizer step and the EMA update."""
    stack = contextlib.ExitStack()
    for name in STEP_PARTS:
        stack.enter_context(_patched(step, name, counter.labelled(f"step.{name}", getattr(step, name))))
    stack.enter_context(_patched(megatron_schedules, "backward_step",
                                 counter.labelled("backward", megatron_schedules.backward_step)))
    for name in ("reduce_task_losses", "finite_and_stop", "_step_totals", "prepare_update", "apply_update"):
        stack.enter_context(_patched(loop, name, counter.labelled(name.strip("_"), getattr(loop, name))))
    parts = [(trainer.loader, "next_global_batch", "data"),
             (trainer.optimizer, "zero_grad", "zero_grad")] + ([(trainer.ema, "update", "ema.update")]
                                                               if trainer.ema is not None else [])
    for owner, name, label in parts:
        stack.enter_context(_patched(owner, name, counter.labelled(label, getattr(owner, name))))
    for chunk in trainer.model:
        modules = [(f"forward.{name}", module) for name, module in chunk.named_children() if name != "layers"]
        for label, module in modules + [("forward.blocks", block) for block in chunk.layers]:
            stack.enter_context(_patched(module, "forward", counter.labelled(label, module.forward)))
        stack.enter_context(_patched(chunk, "forward", counter.labelled("forward.model", chunk.forward)))
    return stack


def step_kernel_counts(trainer: loop.Trainer) -> dict[str, int]:
    """Kernel-launching operators of one ``train_step`` by phase, plus their ``total``."""
    counter = KernelCounter()
    with _phases(counter, trainer), counter:
        loop.train_step(trainer)
    counts = dict(sorted(counter.counts.items()))
    return {**counts, "total": sum(counts.values())}
