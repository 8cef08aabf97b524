"""The training step's host-side helpers give exactly what their per-sample definitions give, and
the benchmark that times them runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.op_counts import KernelCounter
from megatron_mfm.data.rng import Stream, sample_generator
from megatron_mfm.diffusion.flow_matching import FlowMatchingConfig, resolution_shift, sigma_of_draw
from megatron_mfm.tasks.builders import TASKS
from megatron_mfm.training.step import noise_and_sigma, task_loss_report

ROOT = Path(__file__).resolve().parents[1]


def test_noise_and_sigma_are_each_samples_own_streams_bit_for_bit():
    flow = FlowMatchingConfig()
    latents = torch.zeros(5, 16, 3, 8, 8)
    ids = torch.tensor([0, 7, 1_000_003, 42, 7])
    noise, sigma = noise_and_sigma(latents, ids, 11, flow, 48)
    for row, sample_id in enumerate(ids.tolist()):
        expected = torch.randn(16, 3, 8, 8, generator=sample_generator(11, sample_id, Stream.NOISE))
        assert torch.equal(noise[row], expected)
        draw = torch.randn((), dtype=torch.float64, generator=sample_generator(11, sample_id, Stream.SIGMA)).item()
        assert sigma[row].item() == torch.tensor(sigma_of_draw(flow, draw, resolution_shift(flow, 48))).float().item()


def test_a_samples_noise_and_sigma_do_not_depend_on_its_batch():
    """Bitwise the same alone and at another row of a batch of 32: the layout-equivalence tests
    (DP, PP, CP, packing) compare losses bit for bit."""
    flow = FlowMatchingConfig(shift_max=3.0)
    ids = torch.arange(100, 132)
    alone_noise, alone_sigma = noise_and_sigma(torch.zeros(1, 4, 2, 4, 4), ids[17:18], 5, flow, 5000)
    noise, sigma = noise_and_sigma(torch.zeros(32, 4, 2, 4, 4), ids, 5, flow, 5000)
    assert torch.equal(noise[17], alone_noise[0]) and torch.equal(sigma[17].view(1), alone_sigma)
    assert not torch.equal(sigma[16], sigma[17]) and not torch.equal(noise[16], noise[17])


def test_noise_and_sigma_launch_two_ops_a_sample():
    """A sample's noise and its sigma are one kernel-launching torch op each (a batch of 256 spent
    ~40 ms of host time on ~10 ops a sample and on reading the ids one by one)."""
    flow = FlowMatchingConfig()
    counts = []
    for batch in (2, 32):
        latents, ids = torch.zeros(batch, 4, 2, 4, 4), torch.arange(batch)
        with KernelCounter() as counter:
            noise_and_sigma(latents, ids, 3, flow, 64)
        counts.append(counter.counts.total())
    assert counts[1] - counts[0] <= 2 * 30, counts


def test_task_loss_report_sums_in_sample_order_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    per_sample = torch.rand(64, generator=generator) * 7
    tasks = [TASKS[int(i)] for i in torch.randint(0, len(TASKS), (64,), generator=generator)]
    expected = torch.zeros(2, len(TASKS))
    for loss, task in zip(per_sample, tasks):  # the definition: a running sum per task
        expected[0, TASKS.index(task)] += loss
        expected[1, TASKS.index(task)] += 1
    assert torch.equal(task_loss_report(per_sample, tasks).view(torch.int32), expected.view(torch.int32))


def test_step_overhead_benchmark_times_each_part_of_a_real_step(tmp_path):
    """benchmarks/step_overhead.py drives the training loop's own helpers, so it breaks when
    their signatures move (it once passed ``_step_totals`` a list for its StepBatch)."""
    output = tmp_path / "step_overhead.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_overhead.py"), "--config",
                          str(ROOT / "examples" / "tiny_cpu.yaml"), "--repeats", "1", "--output", str(output),
                          f"checkpoint.save={tmp_path / 'checkpoints'}", f"logging.tensorboard_dir={tmp_path / 'tb'}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(output.read_text())["ms_per_micro_batch"]
    parts = {name: ms for name, ms in figures.items() if name not in ("sum_of_parts", "train_step", "render_micro_batch")}
    assert {"step_totals", "ema_update", "loss_and_report"} <= parts.keys()
    assert all(ms >= 0 for ms in parts.values())
    assert figures["sum_of_parts"] == pytest.approx(sum(parts.values()), abs=0.01 * len(parts))
    assert 0 < figures["sum_of_parts"] < figures["train_step"], "the parts are pieces of one whole step"
