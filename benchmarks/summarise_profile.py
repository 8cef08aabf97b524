#!/usr/bin/env python3
"""One line per profile_throughput row (step, MFU, peak memory, the official step beside it) and
the totals of a memory_breakdown JSON: the summaries the benchmarks/gpu scripts print last.

  python benchmarks/summarise_profile.py FOLDER profile.json memory.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_mfm.model.recompute_budget import describe


def row_line(row: dict) -> str:
    what = (f"{row.get('layout', '')} {row['precision']:>5} {row['attention_backend']:>6} {row['recompute']:>7} "
            f"state {row.get('optimizer_state', 'fp32'):>4}")
    if "error" in row:
        return f"{what}: {row['error']}"
    decision = row.get("recompute_decision", {})
    auto = f", {describe(decision)}" if decision else ""
    official = (f", official {row['official_step_s']:.3f} s / {row.get('official_peak_memory_gib') or 0:.1f} GiB, "
                f"speedup {row.get('speedup_vs_official', 0):.2f}x" if row.get("official_step_s") else "")
    return (f"{what}: step {row['step_s']:.3f} s, MFU {row['mfu'] or 0:.1%}, peak {row['peak_memory_gib'] or 0:.1f} GiB"
            f"{official} {row.get('official_error', '')}{auto}")


def memory_line(memory: dict) -> str:
    static = {k: round(v, 1) for k, v in memory["static_gib"].items()}
    return (f"memory ({' '.join(memory['setup'].get('set', []))}): static {static} peak {memory['peak_gib']:.1f} "
            f"blocks kept {memory['blocks_total_kept_gib']:.1f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("names", nargs="+", help="profile_throughput results (a list) or memory_breakdown JSON")
    args = parser.parse_args(argv)
    for name in args.names:
        path = args.folder / name
        if not path.exists():
            print(name, "missing")
            continue
        data = json.loads(path.read_text())
        for line in map(row_line, data) if isinstance(data, list) else [memory_line(data)]:
            print(line)


if __name__ == "__main__":
    main()
