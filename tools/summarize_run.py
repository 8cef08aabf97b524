#!/usr/bin/env python3
"""One line on a run's loss curve from its metrics file (logging.metrics_file): the first and last
logged training losses and the last step time. A run stopped before its first logging interval
has no training record: said so, not an error (the example scripts end with this line)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summary(path: Path) -> str:
    if not path.is_file():
        return f"{path}: no metrics file (the run stopped before writing one)"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in map(json.loads, lines) if "loss" in row]  # training records, not checkpoint ones
    if not rows:
        return f"{path}: no training record yet (the run stopped before its first logging interval)"
    first, last = rows[0], rows[-1]
    text = (f"loss: iteration {first['iteration']} {first['loss']:.4f} -> "
            f"iteration {last['iteration']} {last['loss']:.4f}")
    step_ms = last.get("elapsed time per iteration (ms)")
    return text + (f", {step_ms:.0f} ms/iteration at the end" if step_ms is not None else "")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("metrics", type=Path, help="the run's metrics.jsonl")
    line = summary(parser.parse_args(argv).metrics)
    print(line)
    return line


if __name__ == "__main__":
    main()
