"""Silence known, harmless warnings from dependencies in our command-line entry points."""

from __future__ import annotations

import warnings

_KNOWN = (
    r".*Transformer Engine and Apex are not installed.*",  # expected on CPU: torch fallbacks
    r".*full scope is deprecated.*",
    r".*tp_group is None, using default tp group.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",  # megatron's advice for async TP communication on GPU
    r".*all_gather_into_tensor.*is deprecated.*",
    r".*torch.jit.script_method.*is deprecated.*",
    r".*Detected a Jax installation.*",
    r".*`load_state_dict` is deprecated.*",  # inside megatron dist_checkpointing
)


def quiet_known_warnings() -> None:
    for pattern in _KNOWN:
        warnings.filterwarnings("ignore", message=pattern)
