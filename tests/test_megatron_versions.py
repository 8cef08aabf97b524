"""Checkpoints cross megatron-core versions: saved under one (DP2, distributed optimizer), resumed
under the other, the losses continue as one uninterrupted run. Opt-in: MFM_OTHER_MEGATRON_CORE is
a PYTHONPATH holding another megatron-core (README: the 0.19.2 wheel on Python 3.11)."""

from __future__ import annotations

import os
import subprocess
import sys

import megatron.core
import pytest

from test_training import assert_losses_match, logged_iterations, losses, train

OTHER = os.environ.get("MFM_OTHER_MEGATRON_CORE", "")
pytestmark = pytest.mark.skipif(not OTHER, reason="MFM_OTHER_MEGATRON_CORE (a PYTHONPATH with another megatron-core) unset")


def environment(version: str) -> dict:
    """The environment whose processes import megatron-core ``this`` or ``other``."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(p for p in (OTHER, path) if p)} if version == "other" else {"PYTHONPATH": path}


def test_other_megatron_core_is_another_version():
    found = subprocess.run([sys.executable, "-c", "import megatron.core; print(megatron.core.__version__)"],
                           env={**os.environ, **environment("other")}, capture_output=True, text=True, check=True)
    assert found.stdout.strip() != megatron.core.__version__


@pytest.mark.parametrize("saver,loader", [("other", "this"), ("this", "other")])
def test_checkpoint_resumes_under_the_other_version(tmp_path, saver, loader):
    reference = tmp_path / "reference"
    reference.mkdir()
    train(reference, "train.iterations=6")
    ckpt = tmp_path / "ckpt"
    options = ["train.iterations=6", "parallel.distributed_optimizer=true", f"checkpoint.save={ckpt}"]
    train(tmp_path, *options, "train.stop_iteration=3", ranks=2, env=environment(saver))
    train(tmp_path, *options, f"checkpoint.load={ckpt}", ranks=2, env=environment(loader))
    assert logged_iterations(tmp_path) == list(range(1, 7))  # resumed, not restarted
    assert_losses_match(losses(tmp_path), losses(reference), range(1, 7), 1e-5)


def test_the_split_optimizer_step_equals_megatrons_under_the_other_version():
    """training/optimizer_step.py calls megatron's optimizer phases by name (0.19 renamed one)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_optimizer_step.py"]
    result = subprocess.run(command, env={**os.environ, **environment("other")}, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
