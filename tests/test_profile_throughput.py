"""tools/profile_throughput.py on CPU: runs, writes JSON/CSV, and counts the FLOPs the training
logs count for the same step."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profiler_runs_and_agrees_with_training_flops(tmp_path):
    size = ["--frames", "5", "--height", "32", "--width", "48"]
    profile = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "profile_throughput.py"), "--presets", "tiny", *size,
         "--recompute", "none", "full", "--iterations", "2", "--warmup", "1", "--backend", "local",
         "--output", str(tmp_path / "profile")],
        capture_output=True, text=True, timeout=600)
    assert profile.returncode == 0, profile.stderr[-3000:]
    rows = json.loads((tmp_path / "profile" / "results.json").read_text())
    assert [r["recompute"] for r in rows] == ["none", "full"]
    for row in rows:
        assert row["step_s"] > 0 and row["roofline_s"] > 0 and row["tokens"] == 2 * 2 * 3
        assert row["mfu"] is None, "no MFU claims on CPU"
    with open(tmp_path / "profile" / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2

    metrics = tmp_path / "metrics.jsonl"
    train = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_mfm.py"), "model.backend=local", "train.iterations=1",
         "train.micro_batch_size=1", "train.global_batch_size=1", "data.synthetic.frames=5",
         "data.synthetic.height=32", "data.synthetic.width=48", "data.synthetic.image_fraction=0",
         f"logging.metrics_file={metrics}"],
        capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    logged = json.loads(metrics.read_text().splitlines()[0])
    assert logged["flops per step"] == rows[0]["flops_per_step"]
