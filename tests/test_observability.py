"""Held-out validation loss, token-weighted micro-batches, the profiling window, the interval
averages of the iteration line, rank spread and the checks of their config fields (in-process;
layout parity of the validation loss is in test_training.py)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_mfm.config import ConfigError, load_config
from megatron_mfm.data.rng import Stream, sample_generator
from megatron_mfm.tasks.builders import TASKS
from megatron_mfm.training.loop import setup, train_step
from megatron_mfm.training.observability import IntervalMeter, ProfileWindow, StepResult, spread
from megatron_mfm.training.schedule import batch_tokens, run_schedule
from megatron_mfm.training.step import make_forward_step
from megatron_mfm.training.validation import validation_loss

TINY = ["model.backend=local", "data.synthetic.frames=5", "data.synthetic.height=32", "data.synthetic.width=32",
        "train.ema_decay=0", "optimizer.clip_grad=0", "flow_matching.tokens_base=16", "flow_matching.tokens_max=256"]


def _mixed_seed() -> int:
    """A seed whose first two micro-batch slots are an image and a video (image_fraction 0.5)."""
    def is_image(seed: int, slot: int) -> bool:
        return torch.rand(1, generator=sample_generator(seed, slot, Stream.MICRO_BATCH_KIND)).item() < 0.5
    return next(s for s in range(100) if is_image(s, 0) != is_image(s, 1))


def _gradient(trainer) -> torch.Tensor:
    return torch.cat([p.main_grad.flatten().clone() for p in trainer.model.parameters()])


@pytest.fixture(scope="module")
def trainer(single_process_world):
    seed = _mixed_seed()
    config = load_config(overrides=[*TINY, "train.micro_batch_size=1", "train.global_batch_size=2",
                                    f"train.seed={seed}", f"data.synthetic.seed={seed}",
                                    "data.synthetic.image_fraction=0.5", "validation.num_samples=3",
                                    "validation.sigmas=[0.2, 0.8]", "logging.profile_steps=[1, 1]"])
    return setup(config)


def test_micro_batches_count_by_their_tokens_and_phases_are_profiled(trainer, tmp_path):
    """An image (4 tokens) and a clip (8 tokens) in one step: the gradient is the token-weighted
    mean of their gradients (not the plain mean), and the profiler window records the phases."""
    config = trainer.config
    batches = [trainer.loader.micro_batch(slot) for slot in (0, 1)]
    tokens = [batch_tokens(b) for b in batches]
    assert sorted(tokens) == [4, 8]
    step = make_forward_step(trainer.encoders, config.flow_matching, config.train.seed, 2, torch.float32,
                             trainer.device)
    alone = []
    for batch in batches:
        for chunk in trainer.ddp:
            chunk.zero_grad_buffer()
        run_schedule(config, trainer.ddp, [batch], step, forward_only=False)
        alone.append(_gradient(trainer))
    weighted = (tokens[0] * alone[0] + tokens[1] * alone[1]) / sum(tokens)
    assert not torch.allclose(weighted, (alone[0] + alone[1]) / 2, rtol=1e-3)

    window = ProfileWindow(config.logging, rank=0, out_dir=tmp_path)
    window.before_step(1)
    result = train_step(trainer)
    window.after_step(1)
    assert result.applied
    torch.testing.assert_close(_gradient(trainer), weighted, rtol=1e-4, atol=1e-7)
    names = {event.get("name") for event in json.loads((tmp_path / "rank0.json").read_text())["traceEvents"]}
    assert {"data", "forward-backward", "optimizer"} <= names


def test_validation_loss_is_fixed_and_moves_with_the_weights(trainer):
    first, again = validation_loss(trainer), validation_loss(trainer)
    assert first == again, "same samples, noise and sigmas every time"
    assert {"val/loss", "val/loss/sigma_0.2", "val/loss/sigma_0.8"} <= first.keys()
    tasks = {key.removeprefix("val/loss/") for key in first} & set(TASKS)
    assert tasks, first
    mean_of_sigmas = (first["val/loss/sigma_0.2"] + first["val/loss/sigma_0.8"]) / 2
    assert first["val/loss"] == pytest.approx(mean_of_sigmas, rel=1e-6)
    assert first["val/loss/sigma_0.2"] != first["val/loss/sigma_0.8"]
    train_step(trainer)
    assert validation_loss(trainer)["val/loss"] != first["val/loss"]


def test_interval_averages_weigh_samples_and_applied_steps():
    def result(loss: float, samples: int, grad_norm: float | None) -> StepResult:
        report = torch.zeros(2, len(TASKS))
        report[:, 0] = torch.tensor([loss * samples, samples])
        return StepResult(report, grad_norm, grad_norm is not None, flops=10**12, tokens=100, data_seconds=0.5)

    meter = IntervalMeter(seconds=6.0)
    for step in (result(1.0, 2, 3.0), result(4.0, 6, None), result(2.0, 2, 5.0)):
        meter.add(step)
    averages = meter.averages(world_size=2, peak_tflops=0.0)
    assert averages["loss"] == pytest.approx((2 + 24 + 4) / 10)
    assert averages["grad norm"] == 4.0 and averages["number of skipped iterations"] == 1
    assert averages["elapsed time per iteration (ms)"] == 2000.0
    assert averages["throughput per GPU (TFLOP/s/GPU)"] == pytest.approx(0.25)
    assert averages["data wait per iteration (ms)"] == 500.0


def test_rank_spread_names_the_slowest_rank():
    """(Gathered over real ranks in test_training.py's two-rank runs.)"""
    result = spread(torch.tensor([[0.2, 0.0], [0.5, 0.0], [0.1, 0.3]], dtype=torch.float64))
    assert result["slowest rank"] == 1
    assert result["step time min (ms)"] == pytest.approx(100.0)
    assert result["step time median (ms)"] == pytest.approx(200.0)
    assert result["step time max (ms)"] == pytest.approx(500.0)
    assert result["data wait max (ms)"] == pytest.approx(300.0)


@pytest.mark.parametrize("overrides,world,message", [
    (["validation.interval=1", "validation.num_samples=3"], 2,
     "validation.num_samples=3 is not a multiple of micro_batch_size * data-parallel size = 1 * 2"),
    (["validation.interval=1", "validation.seed=0"], 1, "validation.seed=0 equals data.synthetic.seed"),
    (["validation.sigmas=[0.0, 0.5]"], 1, "validation.sigmas=[0.0, 0.5]"),
    (["validation.interval=-1"], 1, "validation.interval=-1"),
    (["validation.shards_path=/nonexistent"], 1, "validation.shards_path='/nonexistent'"),
    (["logging.profile_steps=[3, 2]"], 1, "logging.profile_steps=[3, 2]"),
    (["logging.profile_steps=[3]"], 1, "logging.profile_steps=[3]"),
    (["logging.profile_ranks=[-1]"], 1, "logging.profile_ranks=[-1]"),
])
def test_bad_observability_config_names_the_field(overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
        config = load_config(overrides=["train.micro_batch_size=1", *overrides])
        config.check_files()
        config.check_world(world)
