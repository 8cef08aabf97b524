"""GPU only: the isolated official process (``profile_throughput.py --row-process official``) takes
our initial weights onto the CPU and leaves nothing of our model on the device, so the official
step's peak memory is its own.

  python -m pytest tests/gpu/test_initial_weights_gpu.py -v
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.plain_baseline import initial_weights
from megatron_mfm.config import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_initial_weights_leave_nothing_on_the_device(single_process_world):
    config = load_config(overrides=["model.preset=mfm-2b", "train.precision=bf16", "train.ema_decay=0"])
    before = torch.cuda.memory_allocated()
    _, weights = initial_weights(config)
    assert all(t.device.type == "cpu" for t in weights.values())
    assert sum(t.numel() * t.element_size() for t in weights.values()) > 3 * 2**30  # MfM-2B in bf16
    assert torch.cuda.memory_allocated() - before < 64 * 2**20
