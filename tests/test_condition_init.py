"""The condition adapter's initialisation lets a from-scratch model see its condition: at step 0
the condition-dependent part of each token is within an order of magnitude of the patch
features (PyTorch's default conv init left it ~1e-6 of them)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
from megatron_mfm.encoders.builtin import LowFrequencyVideoCodec
from megatron_mfm.model.embeddings import SILU_GAIN, ConditionAdapter, PatchEmbed
from megatron_mfm.tasks.builders import IMAGE_TASKS, build_task_sample

CONDITIONED_TASKS = ("i2v", "itrans", "vexd", "vtrans", "isr", "vsr", "icolor", "vcolor", "iinp", "ioutp",
                     "vinp", "voutp", "vedit")


def test_silu_gain_preserves_variance():
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    second_moment = torch.trapezoid(F.silu(z).pow(2) * density, z).item()
    assert SILU_GAIN == pytest.approx(1 / math.sqrt(second_moment), rel=1e-4)


def _rms_over_revealed_frames(features: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """RMS of (B, D, T, h, w) adapter features over the latent frames (groups of 4 pixel frames
    after the first) that reveal any pixel: an i2v clip reveals one frame of many."""
    revealed = condition[:, -1].amax(dim=(2, 3)) > 0  # (B, F) the mask channel
    latent = torch.cat([revealed[:, :1], revealed[:, 1:].unflatten(1, (-1, 4)).any(dim=2)], dim=1)
    return features.pow(2).mean(dim=(1, 3, 4))[latent].mean().sqrt()


@pytest.mark.parametrize("hidden_size", [128, 1792], ids=["tiny", "mfm-2b"])
def test_condition_share_at_init_within_10x(hidden_size):
    dataset = SyntheticVideoDataset(SyntheticConfig(frames=9, height=64, width=64))
    codec = LowFrequencyVideoCodec()
    adapter, patches = ConditionAdapter(5, hidden_size), PatchEmbed(16, hidden_size, 2)
    for task in CONDITIONED_TASKS:
        samples = [build_task_sample(dataset.clip(i, task in IMAGE_TASKS), task, torch.Generator().manual_seed(i))
                   for i in range(2)]
        condition = torch.stack([s.condition for s in samples])
        with torch.no_grad():
            tokens = patches(codec.encode(torch.stack([s.pixels for s in samples])))
            conditioned = adapter(condition) - adapter(torch.zeros_like(condition))
        share = (_rms_over_revealed_frames(conditioned, condition) / tokens.pow(2).mean().sqrt()).item()
        assert 0.1 < share < 10, (task, share)


@pytest.mark.parametrize("frames", [1, 9], ids=["image", "video"])
def test_channels_last_adapter_computes_the_same_function(frames):
    """The NHWC/NDHWC layout (the adapter's on CUDA) gives NCHW's output and gradients: its
    views between the 2D and 3D convolutions keep every frame's pixels and channels in place."""
    reference = ConditionAdapter(5, 64, channels_last=False)
    channels_last = ConditionAdapter(5, 64, channels_last=True)
    channels_last.load_state_dict(reference.state_dict())
    condition = torch.randn(2, 5, frames, 48, 32, generator=torch.Generator().manual_seed(0))
    outputs = [adapter(condition) for adapter in (reference, channels_last)]
    grad = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(1))
    for output in outputs:
        output.backward(grad)
    pairs = [("output", outputs[1], outputs[0])] + [
        (name, actual.grad, expected.grad)
        for (name, expected), actual in zip(reference.named_parameters(), channels_last.parameters())]
    for name, actual, expected in pairs:  # fp32 convolutions summed in another order: 1e-6 to 1e-5
        assert (actual - expected).norm() <= 1e-4 * expected.norm(), name


def test_adapter_layout_benchmark_reports_every_layout(tmp_path):
    from benchmarks.condition_adapter import main

    rows = main(["--preset", "tiny", "--frames", "5", "--height", "32", "--width", "32", "--iterations", "1",
                 "--output", str(tmp_path / "adapter.json")])
    assert [row["layout"] for row in rows] == ["nchw", "channels_last", "channels_last_autotuned"]
    assert all(row["output_rel_diff"] < 1e-4 and row["max_grad_rel_diff"] < 1e-4 for row in rows[1:])
    assert not torch.backends.cudnn.benchmark, "the autotuner's row leaves the process's setting as it was"
    assert json.loads((tmp_path / "adapter.json").read_text()) == rows
