"""``profile_throughput.py --isolate-rows``: every row of the sweep in a process of its own.

In one process each row's peak memory also holds what earlier rows left behind (compiled
graphs, workspaces, caches), so later rows read high. Here the launch re-invokes itself once per
row (its own arguments, the row's values appended: argparse keeps the last) with
``--row-process ours``, and once per official shape with ``--row-process official`` (our model is
built only for its initial weights, then freed, and the official step runs alone), and merges
the rows' JSON in sweep order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import official_baseline

ROW_PROCESSES = ("ours", "official")


def row_arguments(row: dict) -> list[str]:
    """The sweep options that select exactly ``row``."""
    arguments = ["--layouts", row["layout"], "--presets", row["preset"], "--frames", str(row["frames"]),
                 "--height", str(row["height"]), "--width", str(row["width"]), "--recompute", row["recompute"],
                 "--glue", row["glue"], "--attention-backend", row["attention_backend"],
                 "--precision", row["precision"], "--optimizer-state", row["optimizer_state"],
                 "--cuda-graph", row["cuda_graph"]]
    return arguments + (["--fp8-recipe", row["fp8_recipe"]] if row["fp8_recipe"] else [])


def run_row(argv: list[str], row: dict, process: str, folder: Path) -> dict:
    """One row in a fresh process: its result row, or ``row`` with the error."""
    command = [sys.executable, str(Path(__file__).with_name("profile_throughput.py")), *argv, *row_arguments(row),
               "--row-process", process, "--output", str(folder)]
    print(f"[isolated {process}] {' '.join(row_arguments(row))}", flush=True)
    finished = subprocess.run(command, stdout=sys.stdout, stderr=sys.stderr)
    results = folder / "results.json"
    if finished.returncode or not results.exists():
        return {**row, "error": f"row process exited {finished.returncode}"}
    return json.loads(results.read_text())[0]


def isolated_rows(argv: list[str], sweep: list[dict], folder: Path, compare_official: bool) -> list[dict]:
    """Our rows, then one official row per shape, each in its own process; the official
    columns merged into every row of that shape."""
    rows = [run_row(argv, row, "ours", folder / f"row{index}") for index, row in enumerate(sweep)]
    if not compare_official:
        return rows
    officials = {}
    for index, row in enumerate(sweep):
        key = official_baseline.official_key(row)
        if key not in officials:
            officials[key] = run_row(argv, row, "official", folder / f"official{index}")
    for row in rows:
        if "error" not in row:
            official = officials[official_baseline.official_key(row)]
            official_baseline.add_official_columns(row, {k: v for k, v in official.items() if k.startswith("official_")})
    return rows
