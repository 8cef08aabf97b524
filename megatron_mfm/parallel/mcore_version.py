"""The megatron-core versions megatron_mfm runs on, and the one place their APIs differ for us.

0.16.1 is the CPU machines' (Python 3.11; 0.17+ ships cp312 wheels only) and CI's; 0.19.2 runs on
the GPU (Python 3.12). Everything else megatron_mfm calls is the same in both.
"""

from __future__ import annotations

from pathlib import Path

import megatron.core
from megatron.core import dist_checkpointing
from packaging.version import Version

SUPPORTED_MEGATRON_CORE = ("0.16.1", "0.19.2")
MEGATRON_CORE = Version(megatron.core.__version__)

AT_LEAST_0_19 = MEGATRON_CORE >= Version("0.19")
"""From 0.19 dist checkpoints keep their non-sharded state in the shards ("common_state"), not in
``common.pt`` (0.19 reads both, 0.16's own loader only ``common.pt``), and async saves default to
NVIDIA Resiliency Extension's writer."""


def save_dist_checkpoint(sharded_state_dict: dict, path: str | Path, async_save: bool):
    """``dist_checkpointing.save``; an async save returns the request that megatron's
    ``AsyncCallsQueue`` runs (0.19 defaults to NVIDIA Resiliency Extension's writer instead)."""
    options = {"async_strategy": "mcore"} if AT_LEAST_0_19 and async_save else {}
    return dist_checkpointing.save(sharded_state_dict, str(path), async_sharded_save=async_save, **options)


def load_dist_checkpoint(sharded_state_dict: dict, path: str | Path, **kwargs) -> dict:
    """``dist_checkpointing.load`` that reads checkpoints written by either version: under 0.16 the
    common state comes through our reader, which knows both layouts."""
    if AT_LEAST_0_19:
        return dist_checkpointing.load(sharded_state_dict, str(path), **kwargs)
    return dist_checkpointing.load(sharded_state_dict, str(path), common_strategy=_common_reader(), **kwargs)


def grads_for_grad_norm(optimizer) -> list:
    """The gradients a megatron optimizer's global gradient norm covers (shared and tensor-parallel
    duplicate weights once). 0.19 renamed the method; its separately clipped grad-norm groups,
    which it leaves out, are not used by MfM."""
    if AT_LEAST_0_19:
        return optimizer.get_grads_for_grad_norm()
    return optimizer.get_main_grads_for_grad_norm()


def _common_reader():
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    from megatron_mfm.checkpoint.verify import read_common

    class EitherLayoutCommonLoad(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir: str | Path) -> dict:
            return read_common(checkpoint_dir)

    return EitherLayoutCommonLoad()
