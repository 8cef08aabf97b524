"""benchmarks/profile_throughput.py on CPU: a 2-rank sweep of layouts (DP2, TP2, CP2, PP2) and recompute
writes one row per configuration to JSON/CSV, counting the FLOPs the training logs count; with
--compare-plain each row also times the plain-PyTorch implementation's step from the same start."""

from __future__ import annotations

import csv
import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from megatron_mfm.model.config import preset_config
from megatron_mfm.training.flops import training_flops
from benchmarks import profile_row, profile_sweep
from benchmarks.plain_baseline import PlainCase, cpu_weights
from megatron_mfm.training.loop import setup

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "profile_throughput.py"


def test_two_rank_sweep_agrees_with_training_flops(tmp_path):
    from conftest import free_port

    size = ["--frames", "5", "--height", "32", "--width", "48"]
    profile = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         str(TOOL), "--presets", "tiny", *size, "--layouts", "tp1", "tp2", "cp2", "pp2", "--recompute", "none", "full",
         "--iterations", "2", "--warmup", "1", "--backend", "local", "--output", str(tmp_path / "profile")],
        capture_output=True, text=True, timeout=600)
    assert profile.returncode == 0, profile.stderr[-3000:]
    rows = json.loads((tmp_path / "profile" / "results.json").read_text())
    assert [(r["layout"], r["dp"], r["recompute"]) for r in rows] == [
        (layout, dp, recompute) for layout, dp in (("tp1pp1cp1", 2), ("tp2pp1cp1", 1), ("tp1pp1cp2", 1), ("tp1pp2cp1", 1))
        for recompute in ("none", "full")]
    per_sample = training_flops(preset_config("tiny"), (2, 4, 6), 77)
    for row in rows:
        assert row["step_s"] > 0 and row["roofline_s"] > 0 and row["tokens"] == 2 * 2 * 3
        assert row["flops_per_step"] == per_sample * row["dp"], "FLOPs of the whole launch's step"
        assert row["samples_per_s"] == pytest.approx(row["dp"] / row["step_s"])
        assert row["mfu"] is None and row["peak_memory_gib"] is None, "no MFU or GPU memory claims on CPU"
        # same weights, inputs and optimizer in every layout: the same losses
        assert row["losses"] == pytest.approx(rows[0]["losses"], rel=1e-5) and len(row["losses"]) == 2
    with open(tmp_path / "profile" / "results.csv") as handle:
        assert [r["layout"] for r in csv.DictReader(handle)] == [r["layout"] for r in rows]

    metrics = tmp_path / "metrics.jsonl"
    train = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_mfm.py"), "model.backend=local", "train.iterations=1",
         "train.micro_batch_size=1", "train.global_batch_size=1", "data.synthetic.frames=5",
         "data.synthetic.height=32", "data.synthetic.width=48", "data.synthetic.image_fraction=0",
         f"logging.metrics_file={metrics}"],
        capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    logged = json.loads(metrics.read_text().splitlines()[0])
    assert logged["flops per step"] == rows[2]["flops_per_step"]  # tp2: one sample a step, as logged


def test_compare_plain_times_the_same_step(tmp_path):
    """The plain model starts from our weights on our inputs: its losses are ours; recompute
    (checkpointed blocks) changes neither."""
    profile = subprocess.run(
        [sys.executable, str(TOOL), "--presets", "tiny", "--frames", "5", "--height", "32", "--width", "48",
         "--recompute", "none", "full", "first1", "--iterations", "2", "--warmup", "1", "--backend", "local",
         "--compare-plain", "--plain-sdpa-backends", "flash", "math", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert profile.returncode == 0, profile.stderr[-3000:]
    assert "speedup_vs_plain" in profile.stdout
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["recompute"] for r in rows] == ["none", "full", "first1"]
    for row in rows:
        assert row["plain_attention"] == "sdpa:flash,math"
        assert row["plain_step_s"] > 0 and row["plain_tflops_per_gpu"] > 0 and row["speedup_vs_plain"] > 0
        assert row["speedup_vs_plain"] == pytest.approx(row["plain_step_s"] / row["step_s"])
        assert row["plain_tflops_per_gpu"] == pytest.approx(row["flops_per_step"] / row["plain_step_s"] / 1e12)
        assert row["plain_mfu"] is None and row["plain_peak_memory_gib"] is None
        assert row["plain_losses"] == pytest.approx(row["losses"], rel=1e-5) and len(row["losses"]) == 2
        assert row["losses"][1] < row["losses"][0]
    with open(tmp_path / "results.csv") as handle:
        assert all(float(r["speedup_vs_plain"]) > 0 for r in csv.DictReader(handle))


def test_compiled_glue_rows_and_kernel_breakdown(tmp_path):
    """--glue compiled trains the same step (the same losses); --kernel-breakdown splits one more
    profiled step by kernel category (on CPU, the operators' own times), GEMMs and attention
    among them, and prints the table."""
    profile = subprocess.run(
        [sys.executable, str(TOOL), "--presets", "tiny", "--frames", "5", "--height", "32", "--width", "48",
         "--recompute", "full", "--glue", "eager", "compiled", "--kernel-breakdown", "--iterations", "2",
         "--warmup", "1", "--backend", "local", "--output", str(tmp_path), "--kernel-trace", str(tmp_path / "traces")],
        capture_output=True, text=True, timeout=600)
    assert profile.returncode == 0, profile.stderr[-3000:]
    assert "kernel time per step" in profile.stdout and "top kernels: full / compiled" in profile.stdout
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["glue"] for r in rows] == ["eager", "compiled"]
    assert rows[1]["losses"] == pytest.approx(rows[0]["losses"], rel=1e-5)
    for row in rows:
        categories = row["kernel_seconds"]
        # (the CPU's Adam runs per-tensor elementwise operators: "other elementwise", no "optimizer")
        assert categories["gemm"] > 0 and categories["attention"] > 0
        assert row["kernel_busy_s"] == pytest.approx(sum(categories.values()))
        assert row["top_kernels"][0]["seconds"] >= row["top_kernels"][-1]["seconds"] > 0
    traces = sorted((tmp_path / "traces").glob("*.json"))
    assert len(traces) == 2 and all("aten::mm" in trace.read_text() for trace in traces)


def test_kernel_breakdown_counts_operators_not_the_ranges_around_them():
    """A ``record_function`` range spans operators that are counted on their own: it is no kernel
    (the GPU profile of session 9 counted the optimizer's range beside its kernels)."""
    from benchmarks.kernel_profile import kernel_breakdown

    x = torch.randn(128, 128)

    def step():
        with torch.profiler.record_function("a range around the step"):
            for _ in range(3):
                (x @ x).relu_()

    breakdown = kernel_breakdown(step, top=100)
    names = [kernel["name"] for kernel in breakdown["top_kernels"]]
    assert "aten::mm" in names and "a range around the step" not in names
    operators = {(operator["name"], operator["shapes"]): operator for operator in breakdown["top_operators"]}
    assert operators["aten::mm", "[[128, 128], [128, 128]]"]["calls"] == 3
    assert "a range around the step" not in {name for name, _ in operators}


def test_cudnn_layout_transposes_count_with_the_convolutions():
    """Kernel names from an H200 trace of the recipe's step (session 9)."""
    from benchmarks.kernel_profile import kernel_category

    for name in ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false>",
                 "void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true>"):
        assert kernel_category(name) == "convolution"


@pytest.mark.parametrize("argv,message", [
    (["--precision", "fp8"], "--precision fp8 needs Transformer Engine layers on a GPU"),
    (["--layouts", "tp3x"], "--layouts"),
    (["--layouts", "tp2"], "--layouts tp2pp1cp1: tp*pp*cp does not divide the world size 1"),
    (["--fp8-recipe", "just-in-time"], "--fp8-recipe"),
    (["--recompute", "half"], "'half': choose none, full, selective, mlp_act, outputs, auto or first<N>"),
    (["--compare-plain", "--plain-sdpa-backends", "fastest"], "--plain-sdpa-backends"),
    (["--cuda-graph", "full_iteration"], "--cuda-graph full_iteration captures CUDA graphs: it needs a GPU"),
], ids=["fp8-on-cpu", "bad-layout", "layout-too-big", "bad-fp8-recipe", "bad-recompute", "bad-sdpa-backend",
        "graph-on-cpu"])
def test_bad_arguments_name_the_flag(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        profile_sweep.parse_args(argv)
    assert message in capsys.readouterr().err


def test_compare_plain_needs_one_process(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        profile_sweep.parse_args(["--compare-plain"])
    assert "--compare-plain runs the plain model in one process" in capsys.readouterr().err


def test_isolated_row_arguments_select_exactly_that_row():
    """--isolate-rows re-invokes the launch per row with the row's values appended: each child
    sweeps exactly its row (argparse keeps the last value), fp8 recipes and optimizer states too."""
    from benchmarks.isolated_rows import row_arguments

    argv = ["--presets", "tiny", "--recompute", "none", "mlp_act", "--optimizer-state", "fp32", "bf16",
            "--height", "32", "64", "--width", "48", "96", "--isolate-rows"]
    sweep = [what for _, what in profile_sweep.sweep_rows(profile_sweep.parse_args(argv))]
    assert len(sweep) == 8 and len({json.dumps(w, sort_keys=True) for w in sweep}) == 8
    for what in sweep:
        child = profile_sweep.parse_args([*argv, *row_arguments(what), "--row-process", "ours"])
        assert [w for _, w in profile_sweep.sweep_rows(child)] == [what]


def live_parameters() -> int:
    gc.collect()
    return sum(isinstance(o, torch.nn.Parameter) for o in gc.get_objects())


def tiny_row(*extra: str):
    args = profile_sweep.parse_args(["--presets", "tiny", "--frames", "5", "--height", "32", "--width", "48",
                                     "--backend", "local", "--compare-plain", *extra])
    ((layout, what),) = profile_sweep.sweep_rows(args)
    return args, layout, what


def test_official_process_takes_our_initial_weights_without_our_trainer(single_process_world):
    """--row-process official builds only our model, for its initial weights (not our DDP
    buffers and optimizer, which would stay in the official step's peak memory): they equal bit
    for bit those our row's trainer starts from, and no parameter of that model outlives the call."""
    args, layout, what = tiny_row("--row-process", "official")
    before = live_parameters()
    _, case = profile_row.profile_one(args, layout, what)
    assert live_parameters() == before
    trainer = setup(profile_sweep.row_config(args, layout, what))
    ours = cpu_weights(trainer.model[0])
    assert case.weights.keys() == ours.keys()
    assert all(torch.equal(case.weights[name], ours[name]) for name in ours)
    _, target = profile_row.random_batch(trainer.model_config, 5, 32, 48, 1, trainer.device, trainer.dtype,
                                         trainer.config.train.seed)
    assert torch.equal(case.target, target)


def test_plain_case_keeps_no_reference_to_our_trainer(single_process_world):
    """The plain and official steps run while their case is kept: it must not hold our model (through
    the model config, where megatron's DDP leaves its no_sync and grad_sync methods)."""
    args, layout, what = tiny_row()
    trainer = setup(profile_sweep.row_config(args, layout, what))
    batch, target = profile_row.random_batch(trainer.model_config, 5, 32, 48, 1, trainer.device, trainer.dtype, 0)
    case = PlainCase.before_training(trainer, batch, target, recompute=False)
    parameters = [weakref.ref(p) for p in trainer.model.parameters()]
    del trainer
    gc.collect()
    assert case.weights and all(parameter() is None for parameter in parameters)
