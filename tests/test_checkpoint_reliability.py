"""Checkpoints: loading runs no code, a damaged one is named in one line, pruning keeps what
the run wrote, a failed save leaves no partial files, and inspect reads only what it shows."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from megatron_mfm.checkpoint.layout import RNG_PREFIX, TRAINING_STATE_PREFIXES, CheckpointError
from megatron_mfm.checkpoint.model_state import build_from_checkpoint
from megatron_mfm.checkpoint.verify import COMMON_FILE, DCP_METADATA_FILE
from megatron_mfm.checkpoint.training_state import Checkpointer
from megatron_mfm.config import config_to_dict, load_config
from megatron_mfm.training.loop import save, setup, train, train_step

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["model.preset=tiny", "model.num_layers=1", "model.backend=local", "train.micro_batch_size=1",
            "train.global_batch_size=1", "data.synthetic.frames=5", "data.synthetic.height=32",
            "data.synthetic.width=32", "train.ema_decay=0.5"]


class Payload:
    """Unpickling this creates ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def trained(single_process_world, tmp_path_factory):
    """A trainer and the training checkpoint it saved (one folder, iter_0000000)."""
    save_dir = tmp_path_factory.mktemp("safety") / "ckpt"
    trainer = setup(load_config(overrides=[*TINY_RUN, f"checkpoint.save={save_dir}"]))
    train_step(trainer)  # the optimizer holds state to save
    save(trainer)
    return trainer, save_dir / "iter_0000000"


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    target = tmp_path / "ckpt" / "iter_0000000"
    shutil.copytree(trained[1], target)
    (target.parent / "latest").write_text(target.name + "\n")
    return target


def resume(trainer, save_dir: Path) -> int:
    return trainer.checkpointer.load(str(save_dir), trainer.model, trainer.optimizer, trainer.scheduler,
                                     trainer.ema, trainer.loader, trainer.state)


def test_crafted_metadata_runs_no_code(trained, copy, tmp_path):
    marker = tmp_path / "pwned"
    (copy / DCP_METADATA_FILE).write_bytes(pickle.dumps(Payload(marker)))
    for load in (lambda: build_from_checkpoint(copy), lambda: resume(trained[0], copy.parent)):
        with pytest.raises(CheckpointError, match=rf"{DCP_METADATA_FILE}: not loaded.*refused to load io.open"):
            load()
    assert not marker.exists()


def test_crafted_object_in_shards_runs_no_code(trained, copy, tmp_path):
    """The RNG state is stored as a pickled object inside a .distcp file, which torch reads with
    weights_only=False: point its metadata at a payload appended to the file."""
    marker = tmp_path / "pwned"
    metadata = pickle.loads((copy / DCP_METADATA_FILE).read_bytes())  # our own file: trusted here
    index = next(i for i in metadata.storage_data if i.fqn.startswith(RNG_PREFIX))
    shard = copy / metadata.storage_data[index].relative_path
    buffer = io.BytesIO()
    torch.save([Payload(marker)], buffer)
    offset = shard.stat().st_size
    with open(shard, "ab") as stream:
        stream.write(buffer.getvalue())
    metadata.storage_data[index] = _StorageInfo(shard.name, offset, len(buffer.getvalue()))
    (copy / DCP_METADATA_FILE).write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: not loaded.*Unsupported global"):
        resume(trained[0], copy.parent)
    assert not marker.exists()


def test_crafted_common_state_runs_no_code(trained, copy, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    torch.save({"iteration": Payload(marker)}, copy / COMMON_FILE)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default must not be all that protects us
    with pytest.raises(CheckpointError, match=rf"{COMMON_FILE}: not loaded"):
        resume(trained[0], copy.parent)
    assert not marker.exists()


@pytest.mark.parametrize("damaged", ["last shard", COMMON_FILE, DCP_METADATA_FILE])
def test_truncated_file_is_named(copy, damaged):
    file = max(copy.glob("*.distcp")) if damaged == "last shard" else copy / damaged
    if not file.exists():
        pytest.skip(f"no {damaged}: megatron-core 0.19 keeps the common state in the shards")
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{file}: (truncated|corrupt)"):
        build_from_checkpoint(copy)


def test_tool_names_a_crafted_checkpoint_in_one_line(copy, tmp_path):
    marker = tmp_path / "pwned"
    (copy / DCP_METADATA_FILE).write_bytes(pickle.dumps(Payload(marker)))
    result = subprocess.run([sys.executable, "-m", "tools.inspect_checkpoint", str(copy.parent)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and not marker.exists()
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and str(copy / DCP_METADATA_FILE) in last, result.stderr[-2000:]


def test_inspect_diff_of_same_keys_and_model_only_loading(trained, copy, capsys):
    from tools import inspect_checkpoint

    assert not any(k.startswith(TRAINING_STATE_PREFIXES) for k in inspect_checkpoint.tensors(copy, everything=False))
    counts = {}
    for everything in (False, True):
        inspect_checkpoint.report(argparse.Namespace(checkpoint=str(trained[1]), diff=str(copy), all=everything))
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith("0 of ") and last.endswith("; 0 present in one checkpoint only"), last
        counts[everything] = int(last.split()[2])
    assert counts[True] > counts[False], "--all compares the optimizer and EMA tensors too"


def save_at(checkpointer: Checkpointer, trainer, iteration: int) -> None:
    checkpointer.save(iteration, trainer.model, trainer.optimizer, trainer.scheduler, trainer.ema,
                      trainer.loader.state_dict(), trainer.state, config_to_dict(trainer.config))


def test_pruning_keeps_the_checkpoint_just_written(trained, tmp_path):
    """Resumed from an older iteration, a run saves lower numbers than the folders it left behind:
    the newest save is the last written, not the highest-numbered."""
    trainer = trained[0]
    checkpointer = Checkpointer(str(tmp_path), keep_last=1, async_save=False, distributed_optimizer=False)
    save_at(checkpointer, trainer, 12)
    save_at(checkpointer, trainer, 9)
    assert (tmp_path / "latest").read_text().strip() == "iter_0000009"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000009"]
    assert resume(trainer, tmp_path) == 9


def _small_filesystem_command(mount: Path, size: str, command: list[str]) -> list[str] | None:
    """``command`` run with a tmpfs of ``size`` at ``mount`` (a private mount namespace), or None
    where this machine allows no such namespace."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        return None
    script = f'mount -t tmpfs -o size={size} tmpfs "{mount}" && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command]


def test_full_disk_fails_on_every_rank_naming_the_folder(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    command = _small_filesystem_command(mount, "1m", [sys.executable, "-m", "faults.save_on_full_disk", str(mount / "ckpt")])
    if command is None:
        pytest.skip("no user+mount namespaces here to make a small filesystem")
    tests_on_path = os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": tests_on_path})
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # every rank learns why, and nothing partial is left behind
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"rank {rank}:"))
        assert line.startswith(f"rank {rank}: CheckpointError: no space left on {mount / 'ckpt'}: "), line
        assert line.endswith("| left: []"), line


def test_sigterm_without_a_save_folder_says_nothing_was_saved(single_process_world, tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    config = load_config(overrides=[*TINY_RUN, "train.iterations=1000", "logging.interval=1",
                                    f"logging.metrics_file={metrics}"])

    def terminate_after_first_step() -> None:
        while not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_after_first_step, daemon=True).start()
    try:
        trainer = train(config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert trainer.state.iteration < 1000
    out = capsys.readouterr().out
    assert "SIGTERM: stopped at iteration" in out and "nothing saved (checkpoint.save is empty)" in out
    assert "saved iteration" not in out


def test_async_save_and_workers_outlive_a_preemption_signal_to_every_process(tmp_path):
    """``scancel``/``timeout`` signal every process of a run: the data workers and megatron's
    asynchronous checkpoint writer (with the processes it spawns) must outlive it until the
    training process has published its final checkpoint (before: the writer's manager process
    died, the final save failed with 'Connection refused' and left only its .tmp folder)."""
    save_dir = tmp_path / "ckpt"
    overrides = [*TINY_RUN, "train.iterations=100000", "data.synthetic.workers=1", "checkpoint.async_save=true",
                 "checkpoint.interval=3", "checkpoint.keep_last=1", f"checkpoint.save={save_dir}"]
    run = subprocess.Popen([sys.executable, "pretrain_mfm.py", *overrides], cwd=ROOT, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 240
        while not (save_dir / "latest").exists():  # a first checkpoint: the writer machinery exists
            assert run.poll() is None and time.monotonic() < deadline, "no checkpoint was published"
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGTERM)  # every process of the run, as a scheduler does
        out, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, out[-3000:]
    saved = int(out.split("SIGTERM: saved iteration ")[1].split()[0])
    assert (save_dir / "latest").read_text().strip() == f"iter_{saved:07d}"
    assert not list(save_dir.glob("*.tmp"))
