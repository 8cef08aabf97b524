"""Exponential moving average of the weights, sharded like the model and saved with it."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_mfm.model.dit import MfMDiT

EMA_PREFIX = "ema."


class EMA:
    """fp32 shadow of this rank's parameter shards: ema = decay * ema + (1 - decay) * param."""

    def __init__(self, model: MfMDiT, decay: float):
        self.model, self.decay = model, decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.model.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def sharded_state_dict(self, model_sharded: dict) -> dict:
        """ShardedTensors laid out as the model's, keyed ``ema.<model key>``."""
        return {
            EMA_PREFIX + name: dataclasses.replace(sh, key=EMA_PREFIX + sh.key, data=self.shadow[name])
            for name, sh in model_sharded.items()
            if isinstance(sh, ShardedTensor) and name in self.shadow
        }

    def load_state_dict(self, state: dict) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(state[EMA_PREFIX + name])

    @torch.no_grad()
    def copy_to(self, model: MfMDiT) -> None:
        """Write the averaged weights into ``model`` (e.g. a copy used for sampling)."""
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name])
