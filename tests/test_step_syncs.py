"""The training loop waits for the device once per step (the skip decision) and otherwise only
at logging intervals: every such wait goes through observability.to_host / StepTimer."""

from __future__ import annotations

import json

import torch

from megatron_mfm.config import load_config
from megatron_mfm.training.loop import setup, train, train_step
from megatron_mfm.training.observability import HostReads

TINY = ["model.backend=local", "train.micro_batch_size=2", "train.global_batch_size=4", "data.synthetic.frames=5",
        "data.synthetic.height=32", "data.synthetic.width=32", "checkpoint.save=", "checkpoint.interval=0"]


def test_one_host_read_per_step_and_the_rest_at_logging(single_process_world, tmp_path):
    trainer = setup(load_config(overrides=TINY))
    before = HostReads.count
    result = train_step(trainer)
    assert result.applied and not result.stop
    assert HostReads.count - before == 1, "the finite check and the stop flag share one read"

    iterations, interval = 6, 3
    before = HostReads.count
    train(load_config(overrides=[*TINY, f"train.iterations={iterations}", f"logging.interval={interval}",
                                 f"logging.metrics_file={tmp_path / 'metrics.jsonl'}"]))
    logging_reads = iterations // interval  # the interval's loss sums (StepTimer's wait is CUDA-only)
    assert HostReads.count - before == iterations + logging_reads
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["global batch size"] == 4 and line["loss"] > 0 for line in lines), lines


def test_a_stop_request_on_a_rank_is_reported_by_the_step(single_process_world):
    trainer = setup(load_config(overrides=TINY))
    assert train_step(trainer, stop_requested=True).stop
    assert not train_step(trainer).stop
    assert torch.isfinite(train_step(trainer).task_losses).all()
