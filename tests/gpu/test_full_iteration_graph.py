"""GPU only: ``profile_throughput.py --cuda-graph full_iteration`` (megatron's full-iteration CUDA
graph around our forward-backward) trains the same steps as eager. Its first H200 run (session
10) failed at capture: megatron's RNG tracker held tensors, not the graph-safe generators a
capture registers.

    python -m pytest tests/gpu/test_full_iteration_graph.py -v
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOOL = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_throughput.py"


def test_full_iteration_graph_trains_the_eager_steps(tmp_path):
    profile = subprocess.run(
        [sys.executable, str(TOOL), "--presets", "tiny", "--frames", "9", "--height", "64", "--width", "64",
         "--precision", "bf16", "--cuda-graph", "none", "full_iteration", "--iterations", "3", "--warmup", "2",
         "--backend", "local", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert profile.returncode == 0, profile.stderr[-3000:]
    eager, graphed = json.loads((tmp_path / "results.json").read_text())
    assert (eager["cuda_graph"], graphed["cuda_graph"]) == ("none", "full_iteration")
    assert graphed["losses"] == pytest.approx(eager["losses"], rel=1e-3)
