"""The CPU compatibility layer: every patch is in place and does what megatron needs."""

from __future__ import annotations

import types

import pytest
import torch
from megatron.core import tensor_parallel

from megatron_mfm.parallel import cpu_compat


def test_applied_in_test_process(single_process_world):
    assert cpu_compat._applied
    assert torch.cuda.current_device() == torch.device("cpu")


def test_cuda_tensors_land_on_cpu(single_process_world):
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64  # conversions still work


def test_current_stream_orders_nothing(single_process_world):
    """megatron-core 0.19 waits on the current stream before every gradient reduction."""
    stream = torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())
    stream.wait_event(None)


def test_rng_tracker_forks_reproducible_cpu_streams(single_process_world):
    tensor_parallel.model_parallel_cuda_manual_seed(99)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default stream"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "the tracked stream must advance"
    tensor_parallel.model_parallel_cuda_manual_seed(99)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), first), "same seed, same stream"


def test_checkpointed_recompute_replays_rng(single_process_world):
    """megatron's activation checkpointing saves and restores the (CPU) RNG state."""
    x = torch.randn(8, requires_grad=True)
    fn = lambda t: torch.nn.functional.dropout(t, 0.5, training=True) * 2  # noqa: E731
    torch.manual_seed(5)
    expected = fn(x)
    expected.sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    torch.manual_seed(5)
    out = tensor_parallel.checkpoint(fn, False, x)
    out.sum().backward()
    assert torch.equal(out, expected) and torch.equal(x.grad, expected_grad)


def test_missing_patch_target_fails_loudly():
    with pytest.raises(cpu_compat.CpuCompatError, match="no longer exists"):
        cpu_compat._replace(types.SimpleNamespace(), "current_device", lambda: None)


def test_wrong_megatron_version_is_refused(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(cpu_compat.CpuCompatError, match="0.16.1"):
        cpu_compat._check_version()
