"""megatron's optimizer step without its wait for the gradient norm.

megatron-core 0.16's ``optimizer.step()`` reads the global gradient norm on the host
(``.item()`` in ``clip_grads.get_grad_norm_fp32``) to choose the clipping factor: the host waits
for the whole backward, and the GPU then idles while the host prepares the update (the largest
gap in an MfM-2B step's trace on an H200, session 11). Here the norm, the factor
``min(1, clip / (norm + 1e-6))`` and the scaling stay on the device, from the same gradients
and with the same fp64 factor as megatron's (scaling by 1.0 where megatron skips the scaling
changes no bit). The training loop's skip decision reads whether the norm is finite, with the
loss, in its one read a step; the value itself is read only when a log line prints it. The
phases around the clipping are megatron's own (``prepare_grads``, ``step_with_ready_grads``), so
the distributed optimizer's sharding and parameter gather are unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CLIP_EPSILON = 1.0e-6
"""megatron's: ``clip / (norm + 1e-6)``."""


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _members(optimizer) -> list:
    """The optimizers behind ``optimizer`` (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _decoupled(member) -> bool:
    """Whether ``member`` keeps its gradients in ``param.decoupled_grad`` (precision-aware Adam)."""
    return bool(getattr(member.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False))


@torch.no_grad()
def global_grad_norm(optimizer) -> torch.Tensor:
    """The L2 norm of every gradient the optimizer updates (shared and tensor-parallel duplicate
    weights counted once, summed over the ranks megatron sums over): a float64 device scalar.
    Each tensor's norm in fp32, then the norm of those, as megatron's fallback computes it."""
    grads = [grad for member in _members(optimizer) for grad in member.get_main_grads_for_grad_norm()]
    if grads:
        squared = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))) ** 2
    else:
        squared = torch.zeros((), device=_device())
    dist.all_reduce(squared, group=optimizer.get_grad_stats_parallel_group())
    return squared.double().sqrt()


@torch.no_grad()
def clip_by_norm(optimizer, norm: torch.Tensor) -> None:
    """Scale every member's gradients by ``min(1, clip / (norm + 1e-6))``, on the device."""
    for member in _members(optimizer):
        clip = member.config.clip_grad
        if clip <= 0.0 or getattr(member, "is_stub_optimizer", False):
            continue
        attribute = "decoupled_grad" if _decoupled(member) else "grad"
        grads = [getattr(p, attribute) for p in member.get_parameters() if getattr(p, attribute, None) is not None]
        if grads:
            factor = (clip / (norm + CLIP_EPSILON)).clamp(max=1.0).float()
            torch._foreach_mul_(grads, factor)


@torch.no_grad()
def prepare_update(optimizer) -> torch.Tensor:
    """megatron's ``prepare_grads``, then the global gradient norm: non-finite when any gradient
    is (and when megatron's fp16 loss scaler found one), so the step's one host read, the skip
    decision, reads it. Launched before that read, the host does this while the GPU finishes
    the backward."""
    if optimizer.prepare_grads():
        return torch.full((), float("nan"), dtype=torch.float64, device=_device())
    return global_grad_norm(optimizer)


@torch.no_grad()
def apply_update(optimizer, norm: torch.Tensor) -> bool:
    """Clip by ``norm`` on the device and take megatron's step (its ``step_with_ready_grads``)."""
    clip_by_norm(optimizer, norm)
    return optimizer.step_with_ready_grads()
