"""benchmarks/trace_gaps.py on a small Chrome trace laid out as torch.profiler writes one: the
device's idle intervals, the blocking call before each and the code whose launch ends it."""

import gzip
import json

from benchmarks.trace_gaps import find_gaps, host_functions, load_events


def event(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def trace_events():
    return [
        event("python_function", "train.py(10): step", 0, 6000),
        event("kernel", "adapter_conv", 100, 1500, tid=7, correlation=1),
        # the host reads a value: it blocks until the adapter is done, then launches block 0
        event("python_function", "dit.py(156): fit_text", 900, 1000),
        event("cpu_op", "aten::item", 1000, 620),
        event("cuda_runtime", "cudaStreamSynchronize", 1010, 600),
        event("python_function", "dit.py(200): block", 2000, 500),
        event("cuda_runtime", "cudaLaunchKernel", 2100, 10, correlation=42),
        event("kernel", "attention", 2150, 1000, tid=7, correlation=42),
        event("kernel", "gemm", 3160, 800, tid=7, correlation=43),  # 10 us after: not a gap
        event("cuda_runtime", "cudaLaunchKernel", 3100, 10, correlation=43),
        # no blocking call: the host is simply behind in the optimizer
        event("python_function", "optimizer.py(3): step", 4500, 1000),
        event("cuda_runtime", "cudaLaunchKernel", 5100, 10, correlation=44),
        event("kernel", "adam", 5200, 300, tid=7, correlation=44),
        {"ph": "i", "name": "instant", "ts": 5, "pid": 1, "tid": 1},
    ]


def test_gaps_name_the_blocking_call_and_the_launch_that_ends_them(tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": trace_events()}, handle)
    report = find_gaps(load_events(path), min_gap_ms=0.2)
    assert report["gaps"] == 2
    assert report["window_ms"] == (5500 - 100) / 1e3
    assert report["busy_ms"] == (1500 + 1000 + 800 + 300) / 1e3
    assert report["idle_ms"] == (550 + 1240) / 1e3
    blocked, behind = sorted(report["largest"], key=lambda gap: gap["start_ms"])
    assert blocked["idle_ms"] == 0.55 and blocked["start_ms"] == 1.5
    assert blocked["blocked_in"] == "cudaStreamSynchronize"
    assert blocked["blocked_stack"] == ["train.py(10): step", "dit.py(156): fit_text", "aten::item"]
    assert blocked["launched_from"][-1] == "dit.py(200): block" and blocked["next_kernel"] == "attention"
    assert "blocked_in" not in behind and behind["launched_from"][-1] == "optimizer.py(3): step"
    assert report["idle_by_cause_ms"] == {
        "host behind, until train.py(10): step > optimizer.py(3): step": 1.24,
        "waited in dit.py(156): fit_text > aten::item > cudaStreamSynchronize": 0.55}


def test_no_gap_below_the_threshold():
    report = find_gaps([e for e in trace_events() if e.get("ph") == "X"], min_gap_ms=2.0)
    assert report["gaps"] == 0 and report["idle_ms"] == 0


def test_host_time_per_function_counts_a_nested_call_of_the_same_function_once():
    events = [event("python_function", "megatron_mfm/x.py(1): step", 0, 1000),
              event("python_function", "megatron_mfm/x.py(1): step", 200, 300),  # recursion
              event("python_function", "megatron_mfm/y.py(2): block", 100, 400),
              event("python_function", "megatron_mfm/y.py(2): block", 600, 200),
              event("python_function", "torch/nn/module.py(3): __call__", 0, 1000),
              event("cpu_op", "aten::mm", 0, 900)]
    assert host_functions(events, ("megatron_mfm/",)) == {"megatron_mfm/x.py(1): step": 1.0,
                                                          "megatron_mfm/y.py(2): block": 0.6}
