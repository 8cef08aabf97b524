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


def test_the_next_batch_is_fetched_before_the_steps_host_read(single_process_world):
    """The fetch overlaps the device's backward (training/step_batches.py): in the step's
    profile the second "data" range ends before the "skip decision" range (the host read) begins,
    the step trains its own batch, and the batch fetched ahead is the next step's."""
    trainer = setup(load_config(overrides=TINY))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        train_step(trainer, fetch_next=True)
    ranges = {}
    for event in profile.events():
        if event.name in ("data", "skip decision"):
            ranges.setdefault(event.name, []).append(event.time_range)
    fetches, decisions = sorted(ranges["data"], key=lambda r: r.start), ranges["skip decision"]
    assert len(fetches) == 2 and len(decisions) == 1
    assert fetches[1].end <= decisions[0].start
    assert trainer.batches.consumed_samples == 4 and trainer.loader.consumed_samples == 8
    assert trainer.batches.loader_state() == {"consumed_samples": 4}
    train_step(trainer)  # trains the batch fetched ahead: the loader has not moved
    assert trainer.batches.loader_state() == trainer.loader.state_dict() == {"consumed_samples": 8}
