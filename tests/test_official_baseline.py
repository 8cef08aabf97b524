"""--compare-official: the official Transformer3DModel (a checkout of github leeruibin/MfM named by
MFM_OFFICIAL_REPO; skipped without it) trains from our weights on our inputs, so its loss is ours,
and the profiler gives every row the official columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import official_baseline
from benchmarks.plain_baseline import PlainCase
from megatron_mfm.checkpoint.model_state import fill_from_global
from megatron_mfm.config import OptimizerConfig
from megatron_mfm.diffusion.flow_matching import per_sample_mse
from megatron_mfm.export.key_map import from_official
from megatron_mfm.model import MfMDiT, local_layer_spec
from megatron_mfm.model.config import make_config
from mfm_cases import make_inputs, make_reference, megatron_config_kwargs

OFFICIAL = Path(os.environ.get("MFM_OFFICIAL_REPO", "/nonexistent"))
pytestmark = pytest.mark.skipif(not (OFFICIAL / "mfm").is_dir(), reason="set MFM_OFFICIAL_REPO to an MfM checkout")
TOOL = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_throughput.py"


@pytest.mark.parametrize("checkpoint_blocks", [False, True], ids=["no-checkpointing", "full-block"])
def test_official_step_starts_from_our_loss(single_process_world, checkpoint_blocks):
    """Every weight random (the official init would zero the adaLN and head and hide the blocks):
    the official step's first loss equals our model's on the same weights, inputs and target."""
    reference = make_reference()
    config = make_config(**megatron_config_kwargs())
    ours = MfMDiT(config, local_layer_spec())
    fill_from_global(ours, from_official(reference.state_dict(), config))
    inputs = make_inputs(3)
    target = torch.randn_like(inputs["latents"])
    our_loss = per_sample_mse(ours(**inputs), target).mean().item()
    case = PlainCase(config, reference.state_dict(), inputs, target, OptimizerConfig(), checkpoint_blocks)
    official = official_baseline.build_official(OFFICIAL, case, "bf16", compile_blocks=False,
                                                checkpoint_blocks=checkpoint_blocks)
    step = official_baseline.official_step(official, case, "bf16")
    assert step().item() == pytest.approx(our_loss, rel=1e-5)
    assert step().item() < our_loss  # and it trains


def test_profiler_rows_get_the_official_columns(tmp_path):
    profile = subprocess.run(
        [sys.executable, str(TOOL), "--presets", "tiny", "--frames", "5", "--height", "32", "--width", "48",
         "--iterations", "2", "--warmup", "0", "--backend", "local", "--compare-official", str(OFFICIAL),
         "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert profile.returncode == 0, profile.stderr[-3000:]
    assert "speedup_vs_official" in profile.stdout
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["speedup_vs_official"] == pytest.approx(row["official_step_s"] / row["step_s"])
    assert row["official_losses"] == pytest.approx(row["losses"], rel=1e-5)
    assert "enable_cached_compile=False, gradient_checkpointing=None" in row["official_settings"]
    assert row["official_peak_memory_gib"] is None and row["core_attention"] == "SDPACoreAttention"


def test_isolated_rows_run_the_official_step_once_in_its_own_process(tmp_path):
    """With --isolate-rows our row's process times only ours (two H200 launches of session 10
    ran the official step there too, then again alone, and ran out of time)."""
    profile = subprocess.run(
        [sys.executable, str(TOOL), "--presets", "tiny", "--frames", "5", "--height", "32", "--width", "48",
         "--iterations", "2", "--warmup", "0", "--backend", "local", "--compare-official", str(OFFICIAL),
         "--isolate-rows", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert profile.returncode == 0, profile.stderr[-3000:]
    (ours,) = json.loads((tmp_path / "rows" / "row0" / "results.json").read_text())
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert "official_step_s" not in ours and row["official_step_s"] > 0
    assert row["official_losses"] == pytest.approx(row["losses"], rel=1e-5)
