"""GPU only: the synthetic loader's pinned micro-batches (``MicroBatch.pinned``, what training
uses on a GPU with data workers) are page-locked, hold the same data as the unpinned ones, and
their asynchronous copies reach the device intact; so do the step's noise and sigma, drawn into
page-locked memory for a GPU.

    python -m pytest tests/gpu/test_pinned_batches.py -v
"""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.data.batch import MicroBatch
from megatron_mfm.data.loader import SyntheticLoader
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
from megatron_mfm.diffusion.flow_matching import FlowMatchingConfig
from megatron_mfm.tasks.mixture import TaskMixture, TaskMixtureConfig
from megatron_mfm.training.step import noise_and_sigma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _loader(workers: int, pin=None) -> SyntheticLoader:
    config = SyntheticConfig(frames=9, height=64, width=64, workers=workers, prefetch_steps=2)
    return SyntheticLoader(SyntheticVideoDataset(config), TaskMixture(TaskMixtureConfig()), micro_batch_size=16,
                           global_batch_size=32, dp_rank=0, dp_size=1, seed=5, pin=pin)


def test_pinned_batches_match_and_copy_asynchronously():
    plain, pinned = _loader(workers=0), _loader(workers=2, pin=MicroBatch.pinned)
    try:
        for _ in range(3):
            for want, got in zip(plain.next_global_batch(), pinned.next_global_batch()):
                assert got.pixels.is_pinned() and got.condition.is_pinned()
                pixels = got.pixels.to("cuda", non_blocking=True)
                condition = got.condition.to("cuda", non_blocking=True)
                del got  # the host copies may be released before the transfers end
                torch.cuda.synchronize()
                assert torch.equal(pixels.cpu(), want.pixels) and torch.equal(condition.cpu(), want.condition)
    finally:
        pinned.close()


def test_noise_and_sigma_reach_the_gpu_as_drawn():
    ids, flow = torch.arange(40, 296), FlowMatchingConfig()
    expected = noise_and_sigma(torch.zeros(256, 16, 3, 8, 8), ids, 7, flow, 48)
    for _ in range(3):  # reused page-locked blocks: each copy must have finished with the last
        got = noise_and_sigma(torch.zeros(256, 16, 3, 8, 8, device="cuda"), ids, 7, flow, 48)
    torch.cuda.synchronize()
    assert all(g.is_cuda and torch.equal(g.cpu(), e) for g, e in zip(got, expected))
