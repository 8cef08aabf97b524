"""``optimizer.grad_dtype`` and ``optimizer.moments_dtype``: bf16 gradient buffers train like
fp32 ones (CPU, in process) and resume exactly; impossible combinations fail naming the field
before any model is built. 16-bit moments need Transformer Engine: tests/gpu/test_optimizer_memory_gpu.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_mfm.config import ConfigError, load_config
from megatron_mfm.training.components import check_machine
from megatron_mfm.training.loop import train

# 2 micro-batches a step: the gradients also accumulate in the buffers' dtype.
TINY_BF16 = ["model.preset=tiny", "model.num_layers=1", "model.backend=local", "train.precision=bf16",
             "train.micro_batch_size=1", "train.global_batch_size=2", "train.ema_decay=0", "optimizer.lr=1e-3",
             "data.synthetic.frames=5", "data.synthetic.height=32", "data.synthetic.width=32", "train.iterations=4"]


def run(folder: Path, *overrides: str) -> tuple[dict[int, float], object]:
    """Train in this process; iteration -> logged loss (a resumed run logs only its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.jsonl"
    trainer = train(load_config(overrides=[*TINY_BF16, f"logging.metrics_file={metrics}", *overrides]))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}, trainer


@pytest.fixture(scope="module")
def bf16_gradients(single_process_world, tmp_path_factory) -> dict[int, float]:
    losses, trainer = run(tmp_path_factory.mktemp("bf16-grads"), "optimizer.grad_dtype=bf16")
    assert {b.grad_data.dtype for chunk in trainer.ddp for b in chunk.buffers} == {torch.bfloat16}
    return losses


@pytest.mark.parametrize("distributed", [False, True], ids=["optimizer", "distributed-optimizer"])
def test_bf16_gradient_buffers_follow_fp32_ones(bf16_gradients, tmp_path, distributed):
    """The first two losses are equal (Adam's first step is sign(g), rounding does not change it);
    later ones differ only by the gradients' rounding (measured: 1e-5 relative)."""
    fp32, trainer = run(tmp_path, f"parallel.distributed_optimizer={distributed}")
    assert {b.grad_data.dtype for chunk in trainer.ddp for b in chunk.buffers} == {torch.float32}
    assert bf16_gradients[1] == fp32[1]
    for iteration in range(2, 5):
        assert abs(bf16_gradients[iteration] - fp32[iteration]) <= 1e-3 * fp32[iteration], (bf16_gradients, fp32)


def test_bf16_gradients_resume_exactly(bf16_gradients, tmp_path):
    ckpt = tmp_path / "ckpt"
    run(tmp_path / "first", "optimizer.grad_dtype=bf16", "train.stop_iteration=2", f"checkpoint.save={ckpt}")
    resumed, _ = run(tmp_path / "resumed", "optimizer.grad_dtype=bf16", f"checkpoint.load={ckpt}")
    assert sorted(resumed) == [3, 4]
    for iteration in (3, 4):
        assert abs(resumed[iteration] - bf16_gradients[iteration]) <= 1e-6 * bf16_gradients[iteration]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer.grad_dtype=fp16"], "optimizer.grad_dtype='fp16': choose one of ['bf16', 'fp32']"),
        (["optimizer.moments_dtype=fp8"], "optimizer.moments_dtype='fp8': choose one of"),
        (["optimizer.grad_dtype=bf16"], "optimizer.grad_dtype=bf16 needs train.precision=bf16 or fp8"),
        (["optimizer.moments_dtype=bf16", "train.precision=bf16"],
         "optimizer.moments_dtype=bf16 needs parallel.distributed_optimizer=true"),
    ],
)
def test_impossible_combinations_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides=overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU has no Transformer Engine FusedAdam")
def test_16_bit_moments_are_refused_on_the_cpu_before_any_model():
    config = load_config(overrides=["optimizer.moments_dtype=bf16", "train.precision=bf16",
                                    "parallel.distributed_optimizer=true"])
    with pytest.raises(ConfigError, match=r"optimizer.moments_dtype=bf16 needs (Transformer Engine|a GPU)"):
        check_machine(config)


def test_resumed_remainders_reach_fused_adam_as_int16():
    """megatron-core 0.16.1 reads the int16 master-weight remainders back through fp32 buffers and
    Transformer Engine's FusedAdam asserts int16 (a resume failed so on an H200): they arrive as
    int16 again, exactly, and the other states as they were."""
    from types import SimpleNamespace

    from megatron_mfm.training.precision_aware import load_remainders_as_int16

    received = []

    class FusedAdamInterface:  # the two members of TE's FusedAdam that the fix relies on
        store_param_remainders = True

        def set_scaled_state(self, param, state_name, unscaled_state):
            received.append(unscaled_state)

    distributed = SimpleNamespace(optimizer=FusedAdamInterface())
    load_remainders_as_int16(SimpleNamespace(chained_optimizers=[distributed]))
    param = torch.zeros(3, dtype=torch.bfloat16)
    remainders = torch.tensor([-17812, 19253, 32767], dtype=torch.int16)
    distributed.optimizer.set_scaled_state(param, "master_param", remainders.float())
    distributed.optimizer.set_scaled_state(param, "exp_avg", torch.ones(3))
    assert received[0].dtype == torch.int16 and torch.equal(received[0], remainders)
    assert received[1].dtype == torch.float32
