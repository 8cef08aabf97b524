"""16-bit Adam moments through megatron's precision-aware optimizer (``optimizer.moments_dtype``).

megatron-core hands the moments' dtype to Transformer Engine's FusedAdam, which keeps them at
that dtype between steps (widening them to fp32 only inside a step) and keeps the fp32 master
weights as int16 remainders of the bf16 weights (``store_param_remainders``: exact, 2 bytes a
parameter instead of 4). megatron allows it only with the distributed optimizer; the config
checks that, and ``check_fused_adam`` that this machine's TE takes the dtype, before any model.
"""

from __future__ import annotations

import torch

from megatron_mfm.config import ConfigError
from megatron_mfm.config.sections import GRADIENT_DTYPES, MOMENT_DTYPES, OptimizerConfig


def precision_aware_options(optimizer: OptimizerConfig) -> dict:
    """megatron ``OptimizerConfig`` fields for ``optimizer.moments_dtype`` (none for fp32)."""
    if optimizer.moments_dtype == "fp32":
        return {}
    moments = MOMENT_DTYPES[optimizer.moments_dtype]
    return dict(use_precision_aware_optimizer=True, main_grads_dtype=GRADIENT_DTYPES[optimizer.grad_dtype],
                main_params_dtype=torch.float32, exp_avg_dtype=moments, exp_avg_sq_dtype=moments,
                store_param_remainders=True)


def check_fused_adam(optimizer: OptimizerConfig) -> None:
    """16-bit moments need a GPU and a Transformer Engine whose FusedAdam takes them (megatron
    would fail later, on an assert, after building the model)."""
    if optimizer.moments_dtype == "fp32":
        return
    field = f"optimizer.moments_dtype={optimizer.moments_dtype}"
    try:
        from transformer_engine.pytorch.optimizers import FusedAdam
    except ImportError:
        raise ConfigError(f"{field} needs Transformer Engine's FusedAdam: pip install 'megatron_mfm[gpu]' on a GPU "
                          "machine, or optimizer.moments_dtype=fp32") from None
    if not torch.cuda.is_available():
        raise ConfigError(f"{field} needs a GPU (Transformer Engine's FusedAdam), or optimizer.moments_dtype=fp32")
    moments = MOMENT_DTYPES[optimizer.moments_dtype]
    probe = torch.nn.Parameter(torch.zeros(8, device="cuda", dtype=torch.bfloat16))
    try:
        FusedAdam([probe], master_weights=True, use_decoupled_grad=True, exp_avg_dtype=moments,
                  exp_avg_sq_dtype=moments, store_param_remainders=True)
    except (TypeError, RuntimeError) as error:
        raise ConfigError(f"{field}: this Transformer Engine's FusedAdam refuses it ({error}); upgrade "
                          "transformer-engine or set optimizer.moments_dtype=fp32") from None


def load_remainders_as_int16(optimizer) -> None:
    """Resume fix: megatron-core 0.16.1 reads a checkpoint's master-weight remainders (int16)
    into fp32 buffers and hands them to FusedAdam, which asserts int16 (an H200 run, 2026-11-30).
    The values are exact integers, so each FusedAdam of ``optimizer`` casts them back."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        fused = getattr(inner, "optimizer", None)
        if not getattr(fused, "store_param_remainders", False):
            continue
        set_scaled_state = fused.set_scaled_state

        def set_as_int16(param, state_name, unscaled_state, set_state=set_scaled_state):
            if state_name == "master_param" and param.dtype == torch.bfloat16:
                unscaled_state = unscaled_state.to(torch.int16)
            set_state(param, state_name, unscaled_state)

        fused.set_scaled_state = set_as_int16
