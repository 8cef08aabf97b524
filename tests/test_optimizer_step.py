"""training/optimizer_step.py: megatron's optimizer step split around the loop's one host read
gives megatron's weights and gradient norm, bit for bit; the norm is launched without a host
read and is the skip decision's gradient check."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mfm.config import load_config
from megatron_mfm.training.loop import finite_and_stop, setup
from megatron_mfm.training.optimizer_step import apply_update, prepare_update

TINY = ["model.backend=local", "model.num_layers=1", "train.micro_batch_size=1", "train.global_batch_size=1",
        "data.synthetic.frames=5", "data.synthetic.height=32", "data.synthetic.width=32", "checkpoint.save="]


class ScalarReads(TorchDispatchMode):
    """Counts the operators that bring a tensor's value to the host (``.item()``, ``float()``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def set_gradients(trainer, step: int) -> None:
    """The same pseudo-random gradients in every trainer's buffers (the DDP grad buffers are what
    megatron's optimizers read)."""
    generator = torch.Generator().manual_seed(step)
    for chunk in trainer.ddp:
        for buffer in chunk.buffers:
            buffer.grad_data.copy_(torch.randn(buffer.grad_data.shape, generator=generator))


@pytest.mark.parametrize("clip", [0.5, 1e6], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("setting", [["train.precision=fp32"], ["train.precision=bf16"],
                                     ["train.precision=bf16", "parallel.distributed_optimizer=true"]],
                         ids=["fp32", "bf16", "bf16-distributed"])
def test_the_split_step_gives_megatrons_weights_and_norm(single_process_world, setting, clip):
    overrides = [*TINY, *setting, f"optimizer.clip_grad={clip}"]
    ours, megatrons = setup(load_config(overrides=overrides)), setup(load_config(overrides=overrides))
    for step in range(3):
        for trainer in (ours, megatrons):
            set_gradients(trainer, step)
        finite, _, norm = finite_and_stop(torch.zeros(1), prepare_update(ours.optimizer), stop_requested=False)
        applied = apply_update(ours.optimizer, norm)
        megatron_applied, megatron_norm, _ = megatrons.optimizer.step()
        assert finite and applied and megatron_applied
        assert norm == megatron_norm
    assert (norm > clip) == (clip < 1e5), "the gradients must exceed the clip in one case only"
    for (name, param), reference in zip(ours.model.named_parameters(), megatrons.model.parameters()):
        assert torch.equal(param, reference), name


def test_the_norm_is_launched_without_a_host_read(single_process_world):
    trainer = setup(load_config(overrides=[*TINY, "optimizer.clip_grad=0.5"]))
    set_gradients(trainer, 0)
    with ScalarReads() as reads:
        prepare_update(trainer.optimizer)
    assert reads.count == 0


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_with_a_finite_loss_skips_the_step(single_process_world, bad):
    trainer = setup(load_config(overrides=TINY))
    set_gradients(trainer, 0)
    trainer.ddp[0].buffers[0].grad_data[-1] = bad
    finite, stop, _ = finite_and_stop(torch.zeros(3), prepare_update(trainer.optimizer), stop_requested=False)
    assert not finite and not stop
    set_gradients(trainer, 0)
    assert finite_and_stop(torch.zeros(3), prepare_update(trainer.optimizer), stop_requested=True)[:2] == (True, True)
