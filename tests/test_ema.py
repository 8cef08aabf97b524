"""The EMA of the weights forgets the random initialisation early (warm-up), whatever its decay."""

from __future__ import annotations

import torch

from megatron_mfm.model.config import preset_config
from megatron_mfm.model.dit import build_model
from megatron_mfm.model.specs import local_layer_spec
from megatron_mfm.training.ema import EMA


def test_ema_forgets_the_initialisation_within_a_thousand_steps(single_process_world):
    model = build_model(preset_config("tiny"), local_layer_spec())
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)  # the trained weights; the shadow starts at the random init
    for step in range(1000):
        ema.update(step)
    init_share = max((shadow - 1.0).abs().max().item() for shadow in ema.shadow.values())
    assert init_share < 1e-6  # without the warm-up 0.999**1000 = 37% of the init would remain
    assert ema.decay_at(0) < 0.2 and ema.decay_at(10**6) == 0.999
