"""The first losses of a fixed tiny CPU run match the stored curve (tests/golden/tiny_losses.json):
any change to the numerics of data, tasks, codec, noise, model, optimizer or schedule shows here.

After an INTENDED numerical change, regenerate the curve (and say why in the commit):
    PYTHONPATH=.:tests OMP_NUM_THREADS=1 python tests/test_golden_losses.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from test_training import assert_losses_match, losses, train

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_losses.json"
RUN = ("train.iterations=8", "train.seed=7")
RELATIVE_TOLERANCE = 1e-5


def run_curve(tmp: Path) -> dict[int, float]:
    train(tmp, *RUN)
    return losses(tmp)


def test_loss_curve_matches_golden(tmp_path):
    golden = {int(i): loss for i, loss in json.loads(GOLDEN.read_text())["losses"].items()}
    assert_losses_match(run_curve(tmp_path), golden, sorted(golden), RELATIVE_TOLERANCE)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        curve = run_curve(Path(tmp))
    GOLDEN.write_text(json.dumps({"run": list(RUN), "losses": curve}, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
