"""Make megatron-core run on a CPU-only machine over gloo.

megatron-core assumes CUDA in a handful of places (RNG state, ``torch.cuda.current_device()``,
tensors created with ``device='cuda'``, optimizer type assertions). This module patches exactly
those places so that the same parallel code (TP/SP/PP/CP, distributed optimizer, dist
checkpointing) is exercised by CPU tests. It is applied only when CUDA is unavailable; a GPU run
never imports it. Each patch checks that its target still exists, so a megatron-core upgrade that
moves one fails loudly here instead of silently running on CUDA code paths.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from megatron_mfm.parallel.mcore_version import SUPPORTED_MEGATRON_CORE

_applied = False


class CpuCompatError(RuntimeError):
    """A patch target vanished: megatron-core changed under us."""


def _replace(owner: Any, name: str, new: Callable) -> None:
    if not hasattr(owner, name):
        raise CpuCompatError(
            f"cpu_compat: {getattr(owner, '__name__', owner)}.{name} no longer exists; "
            f"megatron_mfm's CPU layer supports megatron-core {', '.join(SUPPORTED_MEGATRON_CORE)}"
        )
    setattr(owner, name, new)


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects ``device='cuda'``, ``.cuda()`` and ``.to('cuda')`` to the CPU.

    ``Tensor.type()`` (no argument) reports ``torch.cuda.*`` names because megatron's optimizers
    assert ``param.type() == 'torch.cuda.FloatTensor'``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_to_cpu_device(a) for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


class _NullStream:
    """The one "stream" of the CPU: everything already runs in order (megatron-core 0.19 reads
    ``torch.cuda.current_stream()`` before every gradient reduction)."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _patch_torch_cuda() -> None:
    cpu = torch.device("cpu")
    stream = _NullStream()
    _replace(torch.cuda, "current_stream", lambda *a, **k: stream)
    _replace(torch.cuda, "current_device", lambda: cpu)
    _replace(torch.cuda, "synchronize", lambda *a, **k: None)
    _replace(torch.cuda, "empty_cache", lambda: None)
    _replace(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace(torch.cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the CPU generator directly.
    _replace(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    _replace(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))


def _patch_distributed_optimizer() -> None:
    """Three fixes for megatron's DistributedOptimizer over torch's Adam (no apex/TE).

    Its state dict reads Adam's ``step`` from torch's
    optimizer state to build its state dict, which fails before the first step, i.e. exactly
    when a checkpoint is being loaded. Before the first step the step count is 0."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.state_dict

    def state_dict(self):
        if self.optimizer.state:
            return original(self)
        groups = []
        for group in self.optimizer.state_dict()["param_groups"]:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "step": 0})
        result = {"optimizer": {"param_groups": groups}}
        if self.grad_scaler:
            result["grad_scaler"] = self.grad_scaler.state_dict()
        return result

    _replace(DistributedOptimizer, "state_dict", state_dict)

    # On load, the per-parameter ``step`` ends up as the placeholder of the parameter-state
    # shards (0), or as ONE tensor shared by every parameter (which torch's Adam then increments
    # once per parameter). Either breaks Adam's bias correction after a resume; the saved step
    # count is the one in the param groups.
    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for group in self.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                if param in self.optimizer.state:
                    self.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))

    _replace(DistributedOptimizer, "load_state_dict", load_state_dict)

    # Per-parameter (fully reshardable) checkpoints hold param/exp_avg/exp_avg_sq only, while the
    # copy-back walks every key of torch Adam's state, ``step`` included: keep the current step
    # (the load fix above then sets it from the param groups).
    original_set = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        kept = {k: v for k, v in self.optimizer.state[main_param].items() if k not in tensors}
        original_set(self, model_param, {**tensors, **kept})

    _replace(DistributedOptimizer, "_set_main_param_and_optimizer_states", set_states)


def _check_version() -> None:
    import megatron.core

    version = megatron.core.__version__
    if version not in SUPPORTED_MEGATRON_CORE:
        raise CpuCompatError(
            f"cpu_compat supports megatron-core {', '.join(SUPPORTED_MEGATRON_CORE)}, found {version}"
        )


def apply() -> None:
    """Install every patch once. Refuses to run where CUDA is available."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise CpuCompatError("cpu_compat must not be applied on a machine with CUDA")
    _check_version()
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_distributed_optimizer()
    _CudaToCpuMode().__enter__()  # process-wide: megatron creates cuda tensors anywhere
    _applied = True
