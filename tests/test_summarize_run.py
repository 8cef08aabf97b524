"""tools/summarize_run.py, the last line of the example scripts: a run stopped before its first
logging interval (only checkpoint records, or no file) is reported, not an IndexError."""

from __future__ import annotations

import json

from tools.summarize_run import summary


def test_summary_of_a_run_with_and_without_training_records(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert "no metrics file" in summary(metrics)
    metrics.write_text(json.dumps({"iteration": 3, "checkpoint/size (GB)": 0.1}) + "\n")
    assert "no training record yet" in summary(metrics)
    records = [{"iteration": 25, "loss": 2.0, "elapsed time per iteration (ms)": 90.0},
               {"iteration": 40, "checkpoint/size (GB)": 0.1},
               {"iteration": 50, "loss": 0.5, "elapsed time per iteration (ms)": 80.4}]
    metrics.write_text("\n".join(map(json.dumps, records)) + "\n")
    assert summary(metrics) == "loss: iteration 25 2.0000 -> iteration 50 0.5000, 80 ms/iteration at the end"
