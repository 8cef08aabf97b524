"""The DiT's training forward and backward as CUDA graphs, one pair per input shape (``model.cuda_graphs``).

With small clips a step's kernels are tiny and the host's launches set the step time: the
convergence recipe (48 tokens a clip) launches ~2,700 kernels a step in its model's forward and
backward, against ~25 ms of GPU work in a ~200 ms step (docs/TRAINING.md). Captured once per
input shape, the forward and the backward each replay as one launch: on an H200 the recipe's
`base` model at batch 64 steps in 50-55 ms instead of ~120 ms, with the same losses (sessions
12-13). Attention runs on SDPA's flash or memory-efficient kernels: graphed runs that could reach
cuDNN's fused attention died with an illegal memory access (docs/PERFORMANCE.md, session 13).

A replay runs the captured kernels on the captured addresses: each step's inputs are copied into
the captured ones; parameters keep their storage (the optimizer, the EMA and checkpoint loads
write them in place); gradients come out of the replayed backward and reach megatron DDP's
buffers through its hooks, as in eager mode. What capture needs, checked by the run's config:
no host read inside the forward (the text keys keep all their rows, masked, where eager mode
trims them to the longest prompt after reading the mask), no random numbers, no collectives
inside (tensor, context and pipeline parallel 1; the data-parallel reductions run after the
replayed backward, from the hooks), no block recompute.
"""

from __future__ import annotations

from typing import Callable

import torch

WARMUP_ITERATIONS = 3
"""Eager forward and backward passes before the capture, on a side stream, as torch's
``make_graphed_callables`` does: lazy initialisation, cuDNN plans and timed kernel choices
happen there, never inside a graph."""


class _Captured:
    """One input shape: the forward and backward graphs and the tensors they read and write."""

    def __init__(self, forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor | None, ...],
                 params: tuple[torch.nn.Parameter, ...]):
        self.inputs = tuple(None if t is None else t.clone() for t in inputs)
        self.params = params
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERATIONS):
                output = forward(*self.inputs)
                torch.autograd.grad(output, params, torch.ones_like(output), allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        # thread-local capture: the data loader's pinning threads keep calling CUDA meanwhile
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, capture_error_mode="thread_local"):
            output = forward(*self.inputs)
        self.grad_output = torch.empty_like(output)
        with torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool(), capture_error_mode="thread_local"):
            self.grads = torch.autograd.grad(output, params, self.grad_output, allow_unused=True)
        self.output = output.detach()

    def load(self, inputs: tuple[torch.Tensor | None, ...]) -> None:
        for captured, given in zip(self.inputs, inputs):
            if captured is not None:
                captured.copy_(given)


class _Replay(torch.autograd.Function):
    """The captured forward as one autograd node whose backward replays the captured backward;
    its inputs are the parameters, so autograd hands each its gradient."""

    @staticmethod
    def forward(ctx, captured: _Captured, *params: torch.nn.Parameter) -> torch.Tensor:
        captured.forward_graph.replay()
        ctx.captured = captured
        return captured.output.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        captured = ctx.captured
        captured.grad_output.copy_(grad_output)
        captured.backward_graph.replay()
        return None, *(None if grad is None else grad.detach() for grad in captured.grads)


class CapturedSteps:
    """``forward(*inputs)`` (tensors or None) replayed from CUDA graphs, captured on the first
    call with each new combination of input shapes and dtypes."""

    def __init__(self, forward: Callable[..., torch.Tensor], module: torch.nn.Module):
        self._forward, self._module = forward, module
        self._captured: dict[tuple, _Captured] = {}

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        key = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in inputs)
        captured = self._captured.get(key)
        if captured is None:
            params = tuple(p for p in self._module.parameters() if p.requires_grad)
            captured = self._captured[key] = _Captured(self._forward, inputs, params)
        else:
            captured.load(inputs)
        return _Replay.apply(captured, *captured.params)

    @property
    def captures(self) -> int:
        """How many input shapes have been captured (each holds its own activation memory)."""
        return len(self._captured)
