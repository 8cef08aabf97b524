"""End-to-end training on CPU: the loss falls, resume is exact (also after a crash mid-save and
after SIGTERM), every layout (TP, SP, DP, PP, CP and their pairs) matches one process in its
losses, held-out validation losses and sampled clips, and bad configs fail naming the field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
# Small and fast: 5-frame 32x32 clips, 4 samples a step (2 micro-batches of 2).
BASE = [
    "model.preset=tiny", "model.backend=local", "train.micro_batch_size=2", "train.global_batch_size=4",
    "train.ema_decay=0.9", "optimizer.lr=1e-3", "optimizer.warmup_iterations=2", "optimizer.decay_style=cosine",
    "data.synthetic.frames=5", "data.synthetic.height=32", "data.synthetic.width=32", "logging.interval=1",
    "flow_matching.tokens_base=16", "flow_matching.tokens_max=256",
]
# Held-out validation loss every 3 iterations and sampled clips at iteration 4 (the reference
# and the layout runs compare them).
VALIDATION = ["validation.interval=3", "validation.num_samples=4", "logging.sample_interval=4",
              "logging.sample_steps=2"]


def train(tmp: Path, *overrides: str, ranks: int = 1, env: dict | None = None, check: bool = True,
          background: bool = False, script: tuple[str, ...] = (str(ROOT / "pretrain_mfm.py"),)):
    """Run pretrain_mfm.py in its own process group; metrics go to tmp/metrics.jsonl and the
    console to tmp/output.log (files, not pipes: helper processes that a crashed run leaves
    behind would hold a pipe open)."""
    args = [*BASE, f"logging.metrics_file={tmp / 'metrics.jsonl'}", *overrides]
    launcher = [sys.executable, *script]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                    "--master-port", str(free_port()), *script]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    log = open(tmp / "output.log", "w")
    process = subprocess.Popen(launcher + args, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    if background:
        return process
    try:
        process.wait(timeout=900)
    finally:
        _kill_group(process)
        log.close()
    result = subprocess.CompletedProcess(process.args, process.returncode, (tmp / "output.log").read_text(), "")
    if check:
        assert result.returncode == 0, result.stdout[-5000:]
    return result


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def records(tmp: Path, key: str) -> list[dict]:
    """The metrics records holding ``key`` (iteration lines: "loss"; validation: "val/loss";
    checkpoints: "checkpoint/size (GB)")."""
    lines = (tmp / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def losses(tmp: Path) -> dict[int, float]:
    """iteration -> loss (the last record wins, as a resumed run rewrites iterations)."""
    return {r["iteration"]: r["loss"] for r in records(tmp, "loss")}


def assert_validation_matches(tmp: Path, expected: Path, iterations: list[int]) -> None:
    """The held-out losses (overall, per task, per sigma) of two runs agree at ``iterations``."""
    got, want = ({r["iteration"]: r for r in records(run, "val/loss")} for run in (tmp, expected))
    assert sorted(got) == iterations
    for i in iterations:
        assert got[i].keys() == want[i].keys() and len(got[i]) > 6, (got[i], want[i])
        for key, value in want[i].items():
            assert abs(got[i][key] - value) <= 1e-5 * abs(value), (i, key, got[i][key], value)


def assert_losses_match(got: dict[int, float], expected: dict[int, float], iterations: Iterable[int],
                        relative: float) -> None:
    for i in iterations:
        assert abs(got[i] - expected[i]) <= relative * abs(expected[i]), (i, got[i], expected[i])


def assert_samples_match(tmp: Path, expected: Path, iteration: int = 4) -> None:
    """The clips sampled at ``iteration`` agree up to rounding before the 8-bit encode."""
    from megatron_mfm.utils.media import read_video

    for task in ("t2v", "i2v"):
        name = f"samples/iter_{iteration:07d}_{task}.mp4"
        got, want = (read_video(run / name).astype(float) for run in (tmp, expected))
        assert abs(got - want).mean() < 0.5, task
    assert (tmp / "samples" / f"iter_{iteration:07d}_sheet.png").stat().st_size > 0


def logged_iterations(tmp: Path) -> list[int]:
    """Every logged iteration in order: a resumed run continues, a restarted one repeats."""
    return [r["iteration"] for r in records(tmp, "loss")]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """12 uninterrupted iterations, one process, validated every 3."""
    tmp = tmp_path_factory.mktemp("reference")
    train(tmp, "train.iterations=12", *VALIDATION, f"logging.sample_dir={tmp / 'samples'}")
    return tmp


@pytest.fixture(scope="module")
def reference_run(reference_dir) -> dict[int, float]:
    return losses(reference_dir)


def test_loss_falls(tmp_path):
    train(tmp_path, "train.iterations=80", "optimizer.lr=2e-3", "optimizer.warmup_iterations=5")
    curve = losses(tmp_path)
    first = sum(curve[i] for i in range(1, 11)) / 10
    last = sum(curve[i] for i in range(71, 81)) / 10
    assert last < 0.75 * first, (first, last)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync-save", "async-save+wandb"])
def test_resume_is_exact(tmp_path, reference_run, async_save):
    ckpt = tmp_path / "ckpt"
    extra = [f"checkpoint.async_save={async_save}"]
    if async_save:  # also exercise wandb, offline, in this run
        extra += ["logging.wandb_project=mfm-test", f"logging.tensorboard_dir={tmp_path / 'tb'}"]
    train(tmp_path, "train.iterations=12", "train.stop_iteration=8", f"checkpoint.save={ckpt}", "checkpoint.interval=4",
          *extra, env={"WANDB_DIR": str(tmp_path)})
    assert (ckpt / "latest").read_text().strip() == "iter_0000008"
    if async_save:
        assert list((tmp_path / "tb" / "wandb").glob("offline-run-*")), "wandb writes an offline run"
    saves = records(tmp_path, "checkpoint/size (GB)")  # each save's time, size and throughput
    assert [r["iteration"] for r in saves] == [4, 8]
    assert all(r["checkpoint/size (GB)"] > 0.01 and r["checkpoint/throughput (GB/s)"] > 0 for r in saves)
    assert all(r["checkpoint/background seconds"] >= 0 and r["checkpoint/blocking seconds"] > 0 for r in saves)
    train(tmp_path, "train.iterations=12", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}", *extra)
    resumed = losses(tmp_path)
    assert_losses_match(resumed, reference_run, range(1, 13), 1e-6)


def test_crash_during_save_resumes_from_previous_checkpoint(tmp_path, reference_run):
    ckpt = tmp_path / "ckpt"
    result = train(tmp_path, "train.iterations=12", f"checkpoint.save={ckpt}", "checkpoint.interval=4",
                   script=(str(ROOT / "tests" / "faults" / "crash_before_publish.py"), "8"), check=False)
    assert result.returncode != 0
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert (ckpt / "iter_0000008.tmp").is_dir() and not (ckpt / "iter_0000008").exists()
    train(tmp_path, "train.iterations=12", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
          "checkpoint.interval=4", "checkpoint.keep_last=2")
    resumed = losses(tmp_path)
    assert_losses_match(resumed, reference_run, range(5, 13), 1e-6)
    assert not (ckpt / "iter_0000008.tmp").exists(), "the stray partial save is cleaned up"
    kept = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000008", "iter_0000012"], "keep_last=2 prunes older checkpoints"


def test_sigterm_saves_and_resume_continues(tmp_path, reference_run):
    ckpt, interrupted = tmp_path / "ckpt", tmp_path / "interrupted"
    interrupted.mkdir()
    process = train(interrupted, "train.iterations=400", f"checkpoint.save={ckpt}", background=True)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    _kill_group(process)
    output = (interrupted / "output.log").read_text()
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: saved iteration" in output
    stopped = int((ckpt / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped < 400
    end = f"train.stop_iteration={stopped + 2}"
    train(interrupted, "train.iterations=400", end, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}")
    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    train(uninterrupted, "train.iterations=400", end)
    expected, resumed = losses(uninterrupted), losses(interrupted)
    assert sorted(expected) == list(range(1, stopped + 3))
    assert_losses_match(resumed, expected, expected, 1e-6)


@pytest.mark.parametrize(
    "layout",
    [["parallel.tensor_parallel=2"], ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
     [], ["parallel.distributed_optimizer=true"], ["parallel.pipeline_parallel=2"], ["parallel.context_parallel=2"],
     ["parallel.context_parallel=2", "parallel.context_parallel_comm=p2p"]],
    ids=["tp2", "tp2-sp", "dp2", "dp2-distopt", "pp2", "cp2", "cp2-ring"],
)
def test_two_rank_layouts_match_one_process(tmp_path, reference_dir, reference_run, layout):
    train(tmp_path, "train.iterations=12", "train.stop_iteration=6", *VALIDATION,
          f"logging.sample_dir={tmp_path / 'samples'}", *layout, ranks=2)
    parallel = losses(tmp_path)
    assert_losses_match(parallel, reference_run, range(1, 7), 1e-5)
    assert_validation_matches(tmp_path, reference_dir, [3, 6])
    assert_samples_match(tmp_path, reference_dir)
    spreads = records(tmp_path, "slowest rank")  # gathered from both ranks at every line
    assert len(spreads) == 6 and all(r["slowest rank"] in (0, 1) for r in spreads)
    assert all(r["step time min (ms)"] <= r["step time max (ms)"] for r in spreads)


@pytest.mark.parametrize(
    "layout",
    [["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.pipeline_parallel=2"],
     ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.context_parallel=2"],
     ["parallel.pipeline_parallel=2", "parallel.context_parallel=2"]],
    ids=["tp2xpp2-sp", "tp2xcp2-sp", "pp2xcp2"])
def test_four_rank_layouts_match(tmp_path, reference_dir, reference_run, layout):
    train(tmp_path, "train.iterations=12", "train.stop_iteration=4", *VALIDATION,
          f"logging.sample_dir={tmp_path / 'samples'}", *layout, ranks=4)
    parallel = losses(tmp_path)
    assert_losses_match(parallel, reference_run, range(1, 5), 1e-5)
    assert_validation_matches(tmp_path, reference_dir, [3])
    assert_samples_match(tmp_path, reference_dir)


def test_packed_micro_batches_train_as_the_bucketed_ones(tmp_path, reference_run):
    """data.packing regroups a step's images (4 tokens) and clips (8 tokens) into packs of at
    most 12 tokens (a clip and an image each; clips alone in steps without images, so a step
    runs 2 to 4 micro-batches): the same samples, token-weighted, so the same losses as the
    bucketed micro-batches of 2."""
    train(tmp_path, "train.iterations=12", "train.stop_iteration=3", "data.packing.token_budget=12")
    assert_losses_match(losses(tmp_path), reference_run, range(1, 4), 1e-5)


def test_interleaved_pipeline_matches_one_process_and_resumes_at_plain_pp(tmp_path):
    """PP3 with two virtual stages per rank (6 layers: rank r runs layers r and r + 3), images and
    videos mixed, against one process (clips sampled at iteration 3 too); its checkpoint then
    resumes at plain PP2."""
    depth = ["model.num_layers=6", "train.iterations=5", "train.micro_batch_size=1", "train.global_batch_size=6"]
    sampled = ["logging.sample_interval=3", "logging.sample_steps=2"]
    reference = tmp_path / "reference"
    reference.mkdir()
    train(reference, *depth, *sampled, f"logging.sample_dir={reference / 'samples'}")
    ckpt = tmp_path / "ckpt"
    train(tmp_path, *depth, "train.stop_iteration=3", "parallel.pipeline_parallel=3",
          "parallel.virtual_pipeline_stages=2", f"checkpoint.save={ckpt}", *sampled,
          f"logging.sample_dir={tmp_path / 'samples'}", ranks=3)
    assert_samples_match(tmp_path, reference, iteration=3)
    train(tmp_path, *depth, "parallel.pipeline_parallel=2", f"checkpoint.load={ckpt}", ranks=2)
    assert logged_iterations(tmp_path) == [1, 2, 3, 4, 5]  # the second run resumed, not restarted
    expected, interleaved = losses(reference), losses(tmp_path)
    assert_losses_match(interleaved, expected, range(1, 6), 1e-5)


def test_checkpoint_saved_at_pp2_resumes_at_dp2(tmp_path, reference_run):
    """Layout change on resume: the dist checkpoint reshards model and optimizer state."""
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "train.iterations=12", "train.stop_iteration=8", "checkpoint.interval=4",
          "parallel.pipeline_parallel=2", f"checkpoint.save={ckpt}", ranks=2)
    train(tmp_path, "train.iterations=12", f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}", ranks=2)
    assert logged_iterations(tmp_path) == list(range(1, 13))
    resumed = losses(tmp_path)
    assert_losses_match(resumed, reference_run, range(1, 13), 1e-5)


@pytest.mark.parametrize(
    "first,second",
    [(["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], []),
     ([], ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])],
    ids=["tp2xpp2-to-dp4", "dp4-to-tp2xpp2"])
def test_four_rank_checkpoint_changes_layout(tmp_path, first, second):
    """Saved at TP2xPP2 and resumed at DP4, and back: the losses continue as uninterrupted."""
    mbs = "train.micro_batch_size=1"  # DP4 needs 4 micro-batch slots per global batch of 4
    reference = tmp_path / "reference"
    reference.mkdir()
    train(reference, "train.iterations=8", mbs)
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "train.iterations=8", "train.stop_iteration=4", mbs, f"checkpoint.save={ckpt}", *first, ranks=4)
    train(tmp_path, "train.iterations=8", mbs, f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}", *second, ranks=4)
    assert logged_iterations(tmp_path) == list(range(1, 9))
    expected, resumed = losses(reference), losses(tmp_path)
    assert_losses_match(resumed, expected, range(1, 9), 1e-5)


def test_distributed_optimizer_checkpoint_resumes_at_another_layout(tmp_path, reference_run):
    """Saved at DP2 with the optimizer state sharded over DP, resumed at TP2 (DP1): the state is
    resharded on load and the losses continue as uninterrupted."""
    ckpt = tmp_path / "ckpt"
    opts = ["parallel.distributed_optimizer=true", f"checkpoint.save={ckpt}"]
    train(tmp_path, "train.iterations=12", "train.stop_iteration=8", "checkpoint.interval=4", *opts, ranks=2)
    train(tmp_path, "train.iterations=12", f"checkpoint.load={ckpt}", "parallel.tensor_parallel=2", *opts, ranks=2)
    assert logged_iterations(tmp_path) == list(range(1, 13))
    resumed = losses(tmp_path)
    assert_losses_match(resumed, reference_run, range(9, 13), 1e-5)


def test_bf16_checkpoint_keeps_the_fp32_ema_and_resumes(tmp_path):
    """bf16 weights beside an fp32 EMA: each is saved at its own dtype, and the resumed run
    continues (logs only the later iterations) with the EMA intact."""
    ckpt = tmp_path / "ckpt"
    opts = ["train.precision=bf16", "train.iterations=4", f"checkpoint.save={ckpt}"]
    train(tmp_path, *opts, "train.stop_iteration=2", "checkpoint.interval=2")
    train(tmp_path, *opts, f"checkpoint.load={ckpt}")
    assert logged_iterations(tmp_path) == [1, 2, 3, 4]
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"


def test_dp_reshardable_checkpoint_at_another_tp_names_the_option(tmp_path):
    ckpt = tmp_path / "ckpt"
    opts = ["parallel.distributed_optimizer=true", "checkpoint.reshardable_optimizer=false", f"checkpoint.save={ckpt}"]
    train(tmp_path, "train.iterations=4", "train.stop_iteration=2", "checkpoint.interval=2", *opts, ranks=2)
    result = train(tmp_path, "train.iterations=4", f"checkpoint.load={ckpt}", "parallel.tensor_parallel=2", *opts,
                   ranks=2, check=False)
    assert result.returncode != 0
    assert "checkpoint.reshardable_optimizer=false (dp_reshardable)" in result.stdout, result.stdout[-2000:]
    assert "parallel.tensor_parallel=1 -> 2" in result.stdout


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.iteratons=5", "train.iteratons: unknown field (did you mean 'iterations'?)"),
        ("model.preset=mfm-3b", "model.preset='mfm-3b'"),
        ("train.global_batch_size=5", "train.global_batch_size=5 is not a multiple of train.micro_batch_size=2"),
        ("optimizer.lr=fast", "optimizer.lr: expected float, got 'fast'"),
        ("data.synthetic.frames=8", "frames=8 must be 4k+1"),
        ("tasks.weights={t2x: 1.0}", "unknown tasks ['t2x']"),
        ("parallel.virtual_pipeline_stages=2", "virtual_pipeline_stages=2 needs parallel.pipeline_parallel >= 3"),
        ("model.recompute_num_layers=1", "model.recompute_num_layers=1: needs model.recompute=true"),
        ("train.precision=fp8", "train.precision=fp8 needs"),  # TE layers on a GPU
    ],
)
def test_bad_config_names_the_field(tmp_path, override, message):
    result = train(tmp_path, override, check=False)
    assert result.returncode != 0
    assert message in result.stdout, result.stdout[-2000:]
    assert "Traceback" not in result.stdout


def test_training_checkpoint_exports_and_samples(tmp_path):
    """Raw and EMA exports of a training checkpoint, validation samples during training, and
    tools/sample.py writing playable mp4s for an image task and a video task."""
    from safetensors.torch import load_file

    from megatron_mfm.tasks.builders import IMAGE_TASKS, TASKS
    from megatron_mfm.utils.media import read_video

    ckpt = tmp_path / "ckpt"
    train(tmp_path, "train.iterations=3", f"checkpoint.save={ckpt}", "logging.sample_interval=3",
          f"logging.sample_dir={tmp_path / 'validation'}", "logging.sample_steps=2")
    assert {p.name for p in (tmp_path / "validation").iterdir()} == {
        "iter_0000003_t2v.mp4", "iter_0000003_i2v.mp4", "iter_0000003_sheet.png"}
    latest = ckpt / (ckpt / "latest").read_text().strip()
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "export-official", "--load", str(latest)]
    exported = {}
    for weights in ("raw", "ema"):
        out = tmp_path / weights
        result = subprocess.run(tool + ["--output", str(out), "--weights", weights], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        exported[weights] = load_file(out / "diffusion_pytorch_model.safetensors")
    key = "proj_out_2.weight"  # the first weights to move (adaLN and head start at zero)
    assert exported["raw"].keys() == exported["ema"].keys()
    assert not torch.equal(exported["raw"][key], exported["ema"][key]), "EMA (decay 0.9) lags the raw weights"

    out = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sample.py"), "--load", str(ckpt), "--tasks", *TASKS,
         "--output", str(out), "--steps", "2", "--frames", "5", "--height", "32", "--width", "48"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for task in TASKS:  # every video task writes a playable mp4 of the right size, every image task a PNG
        path = out / (f"{task}.png" if task in IMAGE_TASKS else f"{task}.mp4")
        assert read_video(path).shape == ((1 if task in IMAGE_TASKS else 5), 32, 48, 3), task
    assert (out / "contact_sheet.png").stat().st_size > 0

    from_export = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sample.py"), "--official", str(tmp_path / "raw"), "--tasks", "i2v",
         "--output", str(tmp_path / "official_samples"), "--steps", "2", "--frames", "5", "--height", "32",
         "--width", "48"], capture_output=True, text=True)
    assert from_export.returncode == 0, from_export.stderr[-3000:]
    assert read_video(tmp_path / "official_samples" / "i2v.mp4").shape == (5, 32, 48, 3)

    # Tensor-parallel sampling gives the same clip (up to rounding before the 8-bit encode).
    tp2 = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         str(ROOT / "tools" / "sample.py"), "--tp", "2", "--load", str(ckpt), "--tasks", "vinp",
         "--output", str(tmp_path / "tp2_samples"), "--steps", "2", "--frames", "5", "--height", "32",
         "--width", "48"], capture_output=True, text=True, timeout=600)
    assert tp2.returncode == 0, tp2.stderr[-3000:]
    single = read_video(out / "vinp.mp4").astype(float)
    assert abs(read_video(tmp_path / "tp2_samples" / "vinp.mp4").astype(float) - single).mean() < 0.5
