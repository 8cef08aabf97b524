"""Exponential moving average of the weights, sharded like the model and saved with it."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_mfm.checkpoint.layout import EMA_PREFIX
from megatron_mfm.model.dit import MfMDiT, ModelChunks


def _parameters_by_key(model: MfMDiT | ModelChunks) -> dict[str, tuple[torch.nn.Parameter, ShardedTensor]]:
    """This rank's parameters keyed as in checkpoints (global layer indices, so the same key on
    every pipeline layout), with their sharding."""
    return {
        name: (sh.data, sh)
        for name, sh in model.sharded_state_dict().items()
        if isinstance(sh, ShardedTensor) and isinstance(sh.data, torch.nn.Parameter)
    }


class EMA:
    """fp32 shadow of this rank's parameter shards: ema = d * ema + (1 - d) * param, with the decay
    warmed up as d = min(decay, (1 + step) / (10 + step)). Without the warm-up a decay of 0.999
    still holds 37% of the random initialisation after 1,000 steps (and that init's zero output
    head shrinks every sampled velocity); with it the initialisation is gone within tens of steps."""

    def __init__(self, model: MfMDiT | ModelChunks, decay: float):
        self.decay = decay
        self.params = _parameters_by_key(model)
        self.shadow = {key: param.detach().float().clone() for key, (param, _) in self.params.items()}

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0 for the first)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the parameters after optimizer step ``step`` (the run's iteration count
        before it, saved in checkpoints: a resumed run continues with the same decays)."""
        # one multi-tensor lerp, not a kernel per parameter (the same lerp, bit for bit); under
        # bf16 each parameter still needs its fp32 copy (``float()`` is free for fp32 ones)
        weight = 1.0 - self.decay_at(step)
        shadows = [self.shadow[key] for key in self.params]
        torch._foreach_lerp_(shadows, [param.detach().float() for param, _ in self.params.values()], weight)

    def sharded_state_dict(self) -> dict:
        """ShardedTensors laid out as the model's, keyed ``ema.<model key>``."""
        return {
            EMA_PREFIX + key: dataclasses.replace(sh, key=EMA_PREFIX + sh.key, data=self.shadow[key],
                                                  dtype=self.shadow[key].dtype)  # fp32 under bf16 training
            for key, (_, sh) in self.params.items()
        }

    def load_state_dict(self, state: dict) -> None:
        for key in self.shadow:
            self.shadow[key].copy_(state[EMA_PREFIX + key])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Write the averaged weights into the model's parameters."""
        for key, (param, _) in self.params.items():
            param.copy_(self.shadow[key])
