"""megatron's optimizer step around the training loop's one host read a step.

megatron-core 0.16's ``optimizer.step()`` reads the global gradient norm on the host
(``.item()`` in ``clip_grads.get_grad_norm_fp32``) to choose the clipping factor; the loop's skip
decision (loss and gradients finite, a stop requested) is a second read just before it. Here the
step is split at megatron's own phases: ``prepare_update`` runs ``prepare_grads`` and launches the
norm on the device, before the read, so the host prepares it while the GPU finishes the backward;
the skip decision reads the norm with its flags (``training/loop.finite_and_stop``); and
``apply_update`` clips with megatron's ``clip_grad_by_total_norm_fp32`` and that host norm (so
no scaling at all when the factor is 1) and takes megatron's ``step_with_ready_grads``. The
distributed optimizer's sharding and parameter gather are megatron's. On the CPU the norm and
the weights are megatron's bit for bit (``tests/test_optimizer_step.py``); on a GPU megatron sums
the norm with Transformer Engine's multi-tensor kernel and this with torch's, so a clipped step's
factor can differ in its last bits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from megatron_mfm.parallel.mcore_version import grads_for_grad_norm


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _members(optimizer) -> list:
    """The optimizers behind ``optimizer`` (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@torch.no_grad()
def global_grad_norm(optimizer) -> torch.Tensor:
    """The L2 norm of every gradient the optimizer updates (shared and tensor-parallel duplicate
    weights counted once, summed over the ranks megatron sums over), as a float64 device scalar
    and without a host read: each tensor's norm in fp32, then the norm of those, squared and
    summed over ranks, as megatron's own (CPU) fallback computes it."""
    grads = [grad for member in _members(optimizer) for grad in grads_for_grad_norm(member)]
    if grads:
        squared = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))) ** 2
    else:
        squared = torch.zeros((), device=_device())
    dist.all_reduce(squared, group=optimizer.get_grad_stats_parallel_group())
    return squared.double().sqrt()


@torch.no_grad()
def prepare_update(optimizer) -> torch.Tensor:
    """megatron's ``prepare_grads``, then the global gradient norm on the device: non-finite when
    any gradient is (NaN when megatron's fp16 loss scaler found one), which makes it the skip
    decision's gradient check."""
    if optimizer.prepare_grads():
        return torch.full((), float("nan"), dtype=torch.float64, device=_device())
    return global_grad_norm(optimizer)


@torch.no_grad()
def apply_update(optimizer, grad_norm: float) -> bool:
    """Clip by the host norm as megatron's step does, then megatron's ``step_with_ready_grads``."""
    for member in _members(optimizer):
        parameters = member.get_parameters()
        if member.config.clip_grad > 0.0 and parameters and not getattr(member, "is_stub_optimizer", False):
            clip_grad_by_total_norm_fp32(parameters, member.config.clip_grad, grad_norm,
                                         member.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads()
