"""The training step's host-side helpers give exactly what their per-sample definitions give."""

from __future__ import annotations

import torch

from megatron_mfm.data.rng import Stream, sample_generator
from megatron_mfm.diffusion.flow_matching import FlowMatchingConfig, sample_sigma
from megatron_mfm.tasks.builders import TASKS
from megatron_mfm.training.step import noise_and_sigma, task_loss_report


def test_noise_and_sigma_are_each_samples_own_streams_bit_for_bit():
    flow = FlowMatchingConfig()
    latents = torch.zeros(5, 16, 3, 8, 8)
    ids = torch.tensor([0, 7, 1_000_003, 42, 7])
    noise, sigma = noise_and_sigma(latents, ids, 11, flow, 48)
    for row, sample_id in enumerate(ids.tolist()):
        expected = torch.randn(16, 3, 8, 8, generator=sample_generator(11, sample_id, Stream.NOISE))
        assert torch.equal(noise[row], expected)
        assert torch.equal(sigma[row:row + 1], sample_sigma(flow, 1, 48, sample_generator(11, sample_id, Stream.SIGMA)))


def test_task_loss_report_sums_in_sample_order_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    per_sample = torch.rand(64, generator=generator) * 7
    tasks = [TASKS[int(i)] for i in torch.randint(0, len(TASKS), (64,), generator=generator)]
    expected = torch.zeros(2, len(TASKS))
    for loss, task in zip(per_sample, tasks):  # the definition: a running sum per task
        expected[0, TASKS.index(task)] += loss
        expected[1, TASKS.index(task)] += 1
    assert torch.equal(task_loss_report(per_sample, tasks).view(torch.int32), expected.view(torch.int32))
