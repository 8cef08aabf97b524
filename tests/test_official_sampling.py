"""tools/sample.py on an official pipeline folder gives the official MfM pipeline's output at the
official script's defaults (scheduler, guidance, prompts, geometry, masks, depth, tiled decoding,
output frames), for all 15 tasks, in float32 on the CPU. Skipped without MFM_OFFICIAL_REPO."""

from __future__ import annotations

import pytest

from megatron_mfm.tasks.builders import TASKS
from official_pipeline import (OFFICIAL_REPO, run_official_script_step, sample_ours, task_inputs, write_media,
                               write_pipeline_folder)
from tools.official_pipeline import load_official_pipeline

pytestmark = pytest.mark.skipif(not OFFICIAL_REPO, reason="set MFM_OFFICIAL_REPO to an official MfM checkout")

FRAMES, HEIGHT, WIDTH, STEPS, SEED = 9, 64, 96, 2, 7  # VAE tiles of 48x40 pixels: decoding is tiled
PROMPT = "a red square moving right"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    folders = write_pipeline_folder(root / "pipeline")
    return folders, write_media(root / "media"), load_official_pipeline(OFFICIAL_REPO, folders["pipeline"], folders["depth"])


@pytest.mark.parametrize("task", TASKS)
def test_sample_equals_the_official_pipeline(task, setup, single_process_world, tmp_path):
    folders, files, official = setup
    flags, input_path, mask_path = task_inputs(task, files)
    ours = sample_ours([
        "--official", folders["pipeline"], "--depth-path", folders["depth"], "--tasks", task, "--prompt", PROMPT,
        "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(STEPS),
        "--seed", str(SEED), "--output", str(tmp_path), *flags], SEED)
    expected = run_official_script_step(official, task, PROMPT, input_path, mask_path, FRAMES, HEIGHT, WIDTH, STEPS, SEED)
    assert ours.shape == expected.shape
    error = ((ours - expected).norm() / expected.norm()).item()
    print(f"{task}: relative error {error:.2e}")
    assert error < 1e-5
