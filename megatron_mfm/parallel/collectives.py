"""Autograd-aware collectives that megatron's mappings do not provide."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward AND backward: for a value every rank consumes differently
    (e.g. a variance whose normalised outputs live on different ranks), the gradient of the
    sum is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-reduce (sum) whose backward also all-reduces."""
    return _AllReduceSum.apply(tensor, group)
