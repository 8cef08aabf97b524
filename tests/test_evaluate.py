"""tools/evaluate.py: its metrics measure what they claim, and a tiny checkpoint gets every
task's metrics and a contact sheet; a bad checkpoint path fails in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_mfm.encoders.builtin import LowFrequencyVideoCodec
from tools.evaluate import colour_statistics, frame_difference, psnr, ssim, whole_latent_cells

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.preset=tiny", "model.backend=local", "train.micro_batch_size=2", "train.global_batch_size=2",
         "data.synthetic.frames=5", "data.synthetic.height=32", "data.synthetic.width=32"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_whole_latent_cells_are_where_a_sample_can_match_the_codec():
    """A sample that encodes the known pixels exactly and noise in the hole matches the codec's
    reconstruction of the truth on the known pixels of whole latent cells, and falls far short of
    it on the known pixels of the cells the hole cuts."""
    generator = torch.Generator().manual_seed(0)
    cells = torch.rand(3, 2, 2, 3, generator=generator) * 2 - 1  # one colour a latent cell: the codec keeps it
    truth = cells.repeat_interleave(torch.tensor([1, 4]), 1).repeat_interleave(8, 2).repeat_interleave(8, 3)
    known = torch.ones(1, 5, 16, 24, dtype=torch.bool)
    known[:, :, 4:12, 12:] = False  # cuts the cells of columns 8-23 in both cell rows
    known[:, 3, 0, 0] = False  # spoils the first cell for frames 1-4 (one latent frame), not frame 0
    expected = torch.zeros_like(known)
    expected[:, :, :, :8] = True
    expected[:, 1:, :8, :8] = False
    whole = whole_latent_cells(known)
    assert torch.equal(whole, expected)
    codec = LowFrequencyVideoCodec()
    reconstruct = lambda clip: codec.decode(codec.encode(clip[None]))[0]  # noqa: E731
    filled = torch.where(known, truth, torch.rand(truth.shape, generator=generator) * 2 - 1)
    sample, reconstructed = reconstruct(filled), reconstruct(truth)
    assert psnr(sample, truth, whole) == pytest.approx(psnr(reconstructed, truth, whole), abs=1e-3)
    cut = known & ~whole
    assert psnr(sample, truth, cut) < psnr(reconstructed, truth, cut) - 10


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


def test_batched_generation_is_each_samples_own(single_process_world):
    """generate_batch (tools/evaluate.py samples a task's clips together) gives each sample the
    clip generate gives it alone with its seed: same noise, same guidance, per-sample prompts and
    conditions."""
    from megatron_mfm.checkpoint.model_state import fill_from_global
    from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
    from megatron_mfm.diffusion.generation import SamplingConfig, generate, generate_batch, task_sample_for
    from megatron_mfm.encoders.interface import builtin_encoders
    from megatron_mfm.export.key_map import from_official
    from megatron_mfm.model import MfMDiT, local_layer_spec
    from megatron_mfm.model.config import make_config
    from mfm_cases import make_reference, megatron_config_kwargs

    config = make_config(**megatron_config_kwargs())
    model = MfMDiT(config, local_layer_spec()).eval()
    fill_from_global(model, from_official(make_reference(seed=5).state_dict(), config))
    encoders = builtin_encoders(config.text_hidden_size)
    dataset = SyntheticVideoDataset(SyntheticConfig(frames=5, height=16, width=32))
    samples = [task_sample_for(dataset.clip(i, is_image=False), task, seed=i) for i, task in ((3, "i2v"), (4, "vinp"))]
    sampling = SamplingConfig(steps=2, guidance_scale=3.0, negative_prompt="blurry")
    batch = generate_batch(model, encoders, samples, sampling, seeds=[11, 12])
    for row, sample, seed in zip(batch, samples, (11, 12)):
        alone = generate(model, encoders, sample, SamplingConfig(**{**vars(sampling), "seed": seed}))
        torch.testing.assert_close(row, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)


def test_evaluate_tiny_checkpoint(tmp_path):
    trained = _run("pretrain_mfm.py", *SMALL, "train.iterations=2", f"checkpoint.save={tmp_path / 'ckpt'}")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  synthetic:\n    frames: 5\n    height: 32\n    width: 32\n")
    tasks = ["t2v", "i2v", "isr", "vinp", "vedit"]
    result = _run("tools/evaluate.py", "--load", str(tmp_path / "ckpt"), "--config", str(config), "--tasks", *tasks,
                  "--samples", "2", "--steps", "2", "--output", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(report["tasks"]) == tasks
    assert {"colour_distance", "frame_difference", "loss"} <= set(report["tasks"]["t2v"])
    assert {"given_frames_psnr", "codec_given_frames_psnr", "loss_zero_condition"} <= set(report["tasks"]["i2v"])
    isr = report["tasks"]["isr"]
    assert isr["input_psnr"] > isr["psnr"]  # two training steps do not beat bicubic
    assert {"known_psnr", "generated_psnr", "text_only_generated_psnr", "known_whole_cells_share"} <= set(
        report["tasks"]["vinp"])
    # each clip's figures too: the task's means are theirs
    for task in tasks:
        for key, mean in report["tasks"][task].items():
            values = [v for v in report["per_clip"][task][key] if v is not None]
            assert len(report["per_clip"][task][key]) == 2 and values, (task, key)
            assert mean == pytest.approx(sum(values) / len(values)), (task, key)
    assert report["per_clip"]["i2v"]["given_frames_psnr"][0] != report["per_clip"]["i2v"]["given_frames_psnr"][1]
    assert set(report["pooled"]["i2v"]) == {"given_frames_psnr", "codec_given_frames_psnr"}
    # the goals of the tasks evaluated, from the pooled PSNRs: two steps reach none of them
    assert set(report["goals"]) == {"i2v: given_frames_psnr - codec_given_frames_psnr", "isr: psnr - input_psnr"}
    sr = report["goals"]["isr: psnr - input_psnr"]
    assert sr["margin_db"] == pytest.approx(report["pooled"]["isr"]["psnr"] - report["pooled"]["isr"]["input_psnr"])
    assert not sr["met"] and not report["goals"]["i2v: given_frames_psnr - codec_given_frames_psnr"]["met"]
    assert "goal isr: psnr - input_psnr" in result.stdout
    sheet = Image.open(tmp_path / "eval" / "contact_sheet.png")
    assert sheet.height == len(tasks) * (3 * 32 + 2)  # condition, sample, truth per task


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = _run("tools/evaluate.py", "--load", str(tmp_path / "none"), "--output", str(tmp_path / "eval"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"--load {tmp_path / 'none'}" in result.stderr.strip().splitlines()[-1]


def test_pooled_psnr_is_the_psnr_of_the_mean_error_and_ignores_an_exact_clip():
    from tools.evaluate import pooled_psnrs, psnr

    truth = torch.zeros(3, 1, 8, 8)
    clips = [truth + 0.2, truth + 0.02]  # mean squared errors 0.04 and 0.0004
    rows = [{"given_frames_psnr": psnr(clip, truth)} for clip in clips]
    pooled = pooled_psnrs(rows)["given_frames_psnr"]
    assert pooled == pytest.approx(10 * math.log10(4 / ((0.04 + 0.0004) / 2)), abs=1e-4)
    # a clip reproduced exactly (106 dB) moves the mean of PSNRs by ~40 dB, the pooled PSNR by 3
    exact = rows[:1] + [{"given_frames_psnr": psnr(truth, truth)}]
    half_the_error = psnr(clips[0], truth) + 10 * math.log10(2)
    assert pooled_psnrs(exact)["given_frames_psnr"] == pytest.approx(half_the_error, abs=1e-3)


def test_goal_checks_compare_pooled_psnrs_with_their_margins():
    from tools.evaluate import goal_checks

    pooled = {"i2v": {"given_frames_psnr": 20.2, "codec_given_frames_psnr": 21.1},
              "isr": {"psnr": 20.6, "input_psnr": 19.7},
              "iinp": {"known_psnr": 19.9, "codec_known_psnr": 21.0, "generated_psnr": 16.0,
                       "text_only_generated_psnr": 8.0}}
    checks = goal_checks(pooled)
    assert {goal: check["met"] for goal, check in checks.items()} == {
        "i2v: given_frames_psnr - codec_given_frames_psnr": True,  # 0.9 dB below the codec
        "iinp: known_psnr - codec_known_psnr": False,  # 1.1 dB below
        "iinp: generated_psnr - text_only_generated_psnr": True,
        "isr: psnr - input_psnr": False,  # 0.9 dB above bicubic, not 1
    }
    assert checks["isr: psnr - input_psnr"]["margin_db"] == pytest.approx(0.9)
