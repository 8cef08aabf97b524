"""Non-finite loss or gradients skip the optimizer step; too many stop the run."""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.config import load_config
from megatron_mfm.training.loop import TooManySkippedSteps, setup, train_step


def test_nonfinite_steps_are_skipped_then_stop(single_process_world):
    config = load_config(overrides=[
        "model.backend=local", "train.micro_batch_size=1", "train.global_batch_size=1", "train.max_skipped_steps=2",
        "data.synthetic.frames=5", "data.synthetic.height=32", "data.synthetic.width=32", "train.ema_decay=0.5",
    ])
    trainer = setup(config)
    _, grad_norm, applied, *_ = train_step(trainer)
    assert applied and grad_norm is not None and grad_norm > 0

    with torch.no_grad():
        trainer.model[0].layers[0].mlp.linear_fc2.bias[0] = float("nan")  # corrupt one weight
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ema_before = {n: t.clone() for n, t in trainer.ema.shadow.items()}
    for expected_skips in (1, 2):
        task_losses, grad_norm, applied, *_ = train_step(trainer)
        assert not applied and grad_norm is None
        assert not torch.isfinite(task_losses).all()
        assert trainer.state.skipped_steps == expected_skips
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]) or torch.equal(param.isnan(), before[name].isnan()), name
    for name, shadow in trainer.ema.shadow.items():
        assert torch.equal(shadow.nan_to_num(), ema_before[name].nan_to_num()), "EMA must not absorb skipped steps"
    with pytest.raises(TooManySkippedSteps, match="max_skipped_steps=2"):
        train_step(trainer)
