"""The EMA of the weights forgets the random initialisation early (warm-up), whatever its decay."""

from __future__ import annotations

import torch

from benchmarks.op_counts import KernelCounter
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


def test_ema_update_is_the_per_parameter_lerp_bit_for_bit_in_one_multi_tensor_kernel(single_process_world):
    model = build_model(preset_config("tiny"), local_layer_spec())
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    expected = {key: shadow.clone().lerp_(param.float(), 1.0 - ema.decay_at(3))
                for (key, shadow), (param, _) in zip(ema.shadow.items(), ema.params.values())}
    counter = KernelCounter()
    with counter:
        ema.update(3)
    assert all(torch.equal(ema.shadow[key], value) for key, value in expected.items())
    # fp32 parameters need no copy: one multi-tensor lerp, not one lerp per parameter tensor
    assert len(ema.params) > 20 and counter.counts["other"] == 1, counter.counts
