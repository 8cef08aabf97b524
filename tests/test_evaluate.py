"""tools/evaluate.py: its metrics measure what they claim, and a tiny checkpoint gets every
task's metrics and a contact sheet; a bad checkpoint path fails in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tools.evaluate import colour_statistics, frame_difference, psnr, ssim

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.preset=tiny", "model.backend=local", "train.micro_batch_size=2", "train.global_batch_size=2",
         "data.synthetic.frames=5", "data.synthetic.height=32", "data.synthetic.width=32"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_psnr_and_ssim_follow_their_definitions():
    clip = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert psnr(clip + 0.2, clip) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item(), rel=1e-5)
    region = torch.zeros(1, 2, 16, 16, dtype=torch.bool)
    region[..., :8] = True
    shifted = clip.clone()
    shifted[..., 8:] += 0.5  # only outside the region
    assert psnr(shifted, clip, region) > 90 and psnr(shifted, clip, ~region) < 13
    assert ssim(clip, clip) == pytest.approx(1.0, abs=1e-6)
    noisy = clip + 0.3 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(1))
    assert 0 < ssim(noisy, clip) < ssim(0.5 * noisy + 0.5 * clip, clip) < 1


def test_colour_statistics_and_frame_difference():
    clip = torch.zeros(3, 3, 4, 4)
    clip[0] = 0.5
    clip[:, 1] += 0.25  # the middle frame is brighter
    stats = colour_statistics(clip)
    assert stats[:3].tolist() == pytest.approx([0.5 + 0.25 / 3, 0.25 / 3, 0.25 / 3])
    assert frame_difference(clip) == pytest.approx(0.25)
    assert frame_difference(clip[:, :1]) == 0.0


def test_evaluate_tiny_checkpoint(tmp_path):
    trained = _run("pretrain_mfm.py", *SMALL, "train.iterations=2", f"checkpoint.save={tmp_path / 'ckpt'}")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  synthetic:\n    frames: 5\n    height: 32\n    width: 32\n")
    tasks = ["t2v", "i2v", "isr", "vinp", "vedit"]
    result = _run("tools/evaluate.py", "--load", str(tmp_path / "ckpt"), "--config", str(config), "--tasks", *tasks,
                  "--samples", "1", "--steps", "2", "--output", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(report["tasks"]) == tasks
    assert {"colour_distance", "frame_difference", "loss"} <= set(report["tasks"]["t2v"])
    assert {"given_frames_psnr", "codec_given_frames_psnr", "loss_zero_condition"} <= set(report["tasks"]["i2v"])
    isr = report["tasks"]["isr"]
    assert isr["input_psnr"] > isr["psnr"]  # two training steps do not beat bicubic
    assert {"known_psnr", "generated_psnr"} <= set(report["tasks"]["vinp"])
    sheet = Image.open(tmp_path / "eval" / "contact_sheet.png")
    assert sheet.height == len(tasks) * (3 * 32 + 2)  # condition, sample, truth per task


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = _run("tools/evaluate.py", "--load", str(tmp_path / "none"), "--output", str(tmp_path / "eval"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"--load {tmp_path / 'none'}" in result.stderr.strip().splitlines()[-1]
