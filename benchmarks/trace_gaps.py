#!/usr/bin/env python3
"""Where the GPU waits on the host, read from a torch.profiler Chrome trace: every interval in
which no kernel, copy or memset runs, with the host call that ended just before it (a
synchronisation shows as a ``cuda*Synchronize`` or blocking copy ending where the gap begins)
and the host stack that launched the kernel ending it (what the GPU was waiting for); and the
time spent in the project's Python functions. Stacks name Python functions when the trace was
recorded ``with_stack=True``, operators otherwise.

  python benchmarks/trace_gaps.py TRACE.json[.gz] [--min-gap-ms 0.2] [--output gaps.json]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "python_function", "user_annotation"}
RUNTIME_CATEGORIES = {"cuda_runtime", "cuda_driver"}


def load_events(path: Path) -> list[dict]:
    """The complete ("X") events of a Chrome trace, plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [event for event in events if event.get("ph") == "X" and "dur" in event]


def is_blocking(name: str) -> bool:
    """A runtime call that returns only when the device has caught up."""
    return "Synchronize" in name or name == "cudaMemcpy"


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The union of device activity, merged, in microseconds."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_CATEGORIES)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


class HostStacks:
    """Which host events enclose a moment, per thread."""

    def __init__(self, events: list[dict]):
        self.by_thread: dict[object, list[dict]] = defaultdict(list)
        for event in events:
            if event.get("cat") in HOST_CATEGORIES:
                self.by_thread[event["tid"]].append(event)
        for thread in self.by_thread.values():
            thread.sort(key=lambda e: e["ts"])
        self.starts = {tid: [e["ts"] for e in thread] for tid, thread in self.by_thread.items()}

    def at(self, tid, moment: float, depth: int) -> list[str]:
        """The innermost ``depth`` enclosing events' names, outermost first."""
        thread = self.by_thread.get(tid, [])
        last = bisect.bisect_right(self.starts.get(tid, []), moment)
        enclosing = [e for e in thread[:last] if e["ts"] + e["dur"] >= moment]
        return [e["name"] for e in enclosing][-depth:]


def find_gaps(events: list[dict], min_gap_ms: float, depth: int = 6) -> dict:
    """Every device-idle interval of at least ``min_gap_ms`` between the first and last kernel,
    with its cause as far as the trace tells, and the totals."""
    busy = busy_intervals(events)
    stacks = HostStacks(events)
    runtime = sorted((e for e in events if e.get("cat") in RUNTIME_CATEGORIES), key=lambda e: e["ts"] + e["dur"])
    runtime_ends = [e["ts"] + e["dur"] for e in runtime]
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    first_kernel = {}
    for event in events:
        if event.get("cat") in DEVICE_CATEGORIES:
            first_kernel.setdefault(event["ts"], event)
    gaps = []
    for (_, idle_from), (idle_to, _) in zip(busy, busy[1:]):
        if (idle_to - idle_from) / 1e3 < min_gap_ms:
            continue
        gap = {"start_ms": (idle_from - busy[0][0]) / 1e3, "idle_ms": (idle_to - idle_from) / 1e3}
        # the latest blocking host call that returned within 0.5 ms after the GPU went idle
        index = bisect.bisect_right(runtime_ends, idle_from + 500)
        for event in reversed(runtime[max(0, index - 50):index]):
            end = event["ts"] + event["dur"]
            if end >= idle_from - 50 and is_blocking(event["name"]):
                gap["blocked_in"] = event["name"]
                gap["blocked_stack"] = stacks.at(event["tid"], event["ts"], depth)
                break
        kernel = first_kernel.get(idle_to)
        launch = launches.get(kernel.get("args", {}).get("correlation")) if kernel else None
        if kernel is not None:
            gap["next_kernel"] = kernel["name"][:120]
        if launch is not None:
            gap["launched_from"] = stacks.at(launch["tid"], launch["ts"], depth)
        gaps.append(gap)
    window_ms = (busy[-1][1] - busy[0][0]) / 1e3 if busy else 0.0
    by_cause: dict[str, float] = defaultdict(float)
    for gap in gaps:
        if "blocked_in" in gap:
            cause = "waited in " + " > ".join(gap["blocked_stack"][-2:] + [gap["blocked_in"]])
        else:
            cause = "host behind, until " + " > ".join(gap.get("launched_from", [])[-2:])
        by_cause[cause] += gap["idle_ms"]
    return {"window_ms": window_ms, "busy_ms": sum(end - start for start, end in busy) / 1e3,
            "idle_ms": sum(gap["idle_ms"] for gap in gaps), "gaps": len(gaps),
            "idle_by_cause_ms": dict(sorted(by_cause.items(), key=lambda item: -item[1])),
            "largest": sorted(gaps, key=lambda gap: -gap["idle_ms"])[:25]}


def host_functions(events: list[dict], marks: tuple[str, ...], top: int = 30) -> dict[str, float]:
    """Milliseconds inside each Python function whose name contains one of ``marks`` (recorded
    ``with_stack=True``), a call nested in another of the same name counted once: where a
    host-bound step's time goes."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "python_function" and any(mark in event["name"] for mark in marks):
            spans[event["name"]].append((event["ts"], event["ts"] + event["dur"]))
    totals = {}
    for name, intervals in spans.items():
        total, reach = 0.0, float("-inf")
        for start, end in sorted(intervals):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        totals[name] = total / 1e3
    return dict(sorted(totals.items(), key=lambda item: -item[1])[:top])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-gap-ms", type=float, default=0.2)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--host-functions", nargs="*", default=["megatron_mfm/", "megatron/core/"], metavar="MARK",
                        help="also the time spent in Python functions whose name contains one of these")
    args = parser.parse_args(argv)
    events = load_events(args.trace)
    report = find_gaps(events, args.min_gap_ms)
    if args.host_functions:
        report["host_functions_ms"] = host_functions(events, tuple(args.host_functions))
    text = json.dumps(report, indent=1)
    if args.output:
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
