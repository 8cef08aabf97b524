"""The loader with ``data.shards.precomputed``: sidecars written by data_prep/encode_shards.py (tiny
random CogVideoX VAE and T5, posterior mode) give the training step the inputs it would encode
itself; clips decoded otherwise, missing and corrupt sidecars fall back to encoding and are
counted; settings no sample can use are refused naming the field. Also: later pipeline stages get
no condition."""

from __future__ import annotations

import re
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_mfm.data.shards.buckets import Bucket
from megatron_mfm.data.shards.catalog import SampleEntry, load_catalog
from megatron_mfm.encoders.interface import build_encoders
from megatron_mfm.data.batch import MicroBatch, collate
from megatron_mfm.data.shards.precomputed import SETTINGS, SidecarSettings
from megatron_mfm.data.shards.stages import StageConfig
from megatron_mfm.data.shards.streaming import ShardDataConfig, ShardLoader
from megatron_mfm.diffusion.flow_matching import FlowMatchingConfig
from megatron_mfm.model import MfMDiT, local_layer_spec
from megatron_mfm.model.config import preset_config
from megatron_mfm.tasks.builders import Clip, build_task_sample
from megatron_mfm.tasks.mixture import TaskMixtureConfig
from megatron_mfm.training.step import make_forward_step
from test_encode_shards import paths, run, shards  # noqa: F401 (fixtures)
from tiny_pretrained import TEXT_WIDTH, save_depth, tiny_config

CPU = torch.device("cpu")
STAGE = StageConfig(resolutions=[[32, 48]], frames=[9])  # the sidecars' 9 x 32 x 48 at 12 fps


@pytest.fixture(scope="module")
def sidecars(shards, paths, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("sidecars")
    run(shards, out, paths)
    return out


@pytest.fixture(scope="module")
def encoders(paths):  # noqa: F811
    return build_encoders(tiny_config(paths), TEXT_WIDTH, CPU)


def shard_loader(shards: Path, sidecars: Path | str, stages: list[StageConfig] = [STAGE], fps: float = 12,
                 text_dropout: float = 0.0) -> ShardLoader:
    config = ShardDataConfig(path=str(shards), precomputed=str(sidecars), fps=fps, workers=0, prefetch_steps=0)
    return ShardLoader(config, stages, TaskMixtureConfig(text_dropout=text_dropout), micro_batch_size=1,
                       global_batch_size=3, dp_rank=0, dp_size=1, seed=3)


def model_inputs(encoders, batch: MicroBatch, model: MfMDiT) -> tuple[tuple, torch.Tensor]:
    """What the training step hands the DiT (noisy latents, timestep, text, mask, condition,
    motion) and its loss."""
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(args))
    try:
        step = make_forward_step(encoders, FlowMatchingConfig(), seed=0, patch_size=2, dtype=torch.float32,
                                 device=CPU)
        output, loss = step(iter([batch]), model)
    finally:
        hook.remove()
    return seen[0], loss(output)[0]


def test_sidecar_inputs_equal_on_the_fly_encoding(shards, sidecars, encoders, single_process_world):  # noqa: F811
    loader = shard_loader(shards, sidecars)
    batches = loader.next_global_batch()
    assert sorted(int(b.sample_ids[0]) for b in batches) == [0, 1, 2]
    assert {b.pixels.shape[2] for b in batches} == {1, 9}  # the still image and the two clips
    assert not loader.sidecar_misses
    model = MfMDiT(preset_config("tiny", pipeline_dtype=torch.float32), local_layer_spec())
    torch.nn.init.normal_(model.head_proj.weight)  # a zero head would hide the text's effect on the loss
    for batch in batches:
        (found,) = batch.precomputed
        assert found.latents is not None and found.text is not None
        with_sidecar, loss = model_inputs(encoders, batch, model)
        on_the_fly, expected_loss = model_inputs(encoders, replace(batch, precomputed=None), model)
        for got, expected in zip(with_sidecar[:4], on_the_fly[:4]):  # noisy latents, timestep, text, mask
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(with_sidecar[4], on_the_fly[4]) and torch.equal(with_sidecar[5], on_the_fly[5])
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        direct = encoders.encode_video(batch.pixels)[0]  # the clip the loader decoded, through the VAE
        torch.testing.assert_close(found.latents, direct, rtol=1e-5, atol=1e-6)
        shifted = replace(found, latents=found.latents + 1, text=found.text * 2)  # the step reads the sidecar
        moved, _ = model_inputs(encoders, replace(batch, precomputed=[shifted]), model)
        sigma = with_sidecar[1] / 1000
        torch.testing.assert_close(moved[0] - with_sidecar[0], (1 - sigma).view(-1, 1, 1, 1, 1).expand_as(moved[0]))
        torch.testing.assert_close(moved[2], with_sidecar[2] * 2)


def test_other_clips_prompts_and_broken_sidecars_fall_back_and_are_counted(shards, sidecars, tmp_path):  # noqa: F811
    short_then_full = [StageConfig(name="5 frames", iterations=1, resolutions=[[32, 48]], frames=[5]), STAGE]
    loader = shard_loader(shards, sidecars, short_then_full, text_dropout=1.0)
    first, second = loader.next_global_batch(), loader.next_global_batch()
    videos = sum(b.pixels.shape[2] > 1 for b in first)
    assert videos == 2 and all(b.precomputed[0].text is None for b in first + second)  # dropout: empty prompts
    assert all(b.precomputed[0].latents is None for b in first if b.pixels.shape[2] == 5)
    assert all(b.precomputed[0].latents is not None for b in second)
    assert loader.sidecar_misses == {"latents: other clip": videos, "text: other prompt": 6}

    broken = tmp_path / "broken"
    shutil.copytree(sidecars, broken)
    catalog = load_catalog(shards)
    missing_shard, corrupt = catalog[0].shard, next(e for e in catalog if e.shard != catalog[0].shard)
    (broken / missing_shard).unlink()
    with tarfile.open(broken / corrupt.shard) as tar:
        member = tar.getmember(f"{corrupt.key}.latents.npy")
    with open(broken / corrupt.shard, "r+b") as handle:  # same size, not an .npy any more
        handle.seek(member.offset_data)
        handle.write(b"\0" * member.size)
    loader = shard_loader(shards, broken)
    batches = loader.next_global_batch()
    in_missing = sum(e.shard == missing_shard for e in catalog)
    assert loader.sidecar_misses == {"latents: missing": in_missing, "text: missing": in_missing,
                                     "latents: corrupt": 1}
    keys = {int(b.sample_ids[0]): b.precomputed[0] for b in batches}
    assert sum(p.latents is None for p in keys.values()) == in_missing + 1
    assert sum(p.text is None for p in keys.values()) == in_missing


def test_unusable_settings_are_refused_naming_the_field(shards, sidecars, tmp_path):  # noqa: F811
    where = re.escape(f"data.shards.precomputed='{sidecars}': {SETTINGS} has")
    with pytest.raises(ValueError, match=where + re.escape(" height=32, width=48; data.stages train at [(32, 32)]")):
        shard_loader(shards, sidecars, [StageConfig(resolutions=[[32, 32]], frames=[9])])
    with pytest.raises(ValueError, match=where + re.escape(" frames=9; data.stages use frames [5]")):
        shard_loader(shards, sidecars, [StageConfig(resolutions=[[32, 48]], frames=[5])])
    with pytest.raises(ValueError, match=where + " fps=12; data.shards.fps=16"):
        shard_loader(shards, sidecars, fps=16)
    with pytest.raises(ValueError, match=re.escape(f"precomputed='{tmp_path}': no readable {SETTINGS}")):
        ShardDataConfig(path=str(shards), precomputed=str(tmp_path))


def test_sidecars_at_the_stored_rate_match_only_the_same_source_frames():
    """Sidecars encoded at each video's own rate (encode_shards without --fps) hold the frames the
    loader takes only when the source is no faster than data.shards.fps."""
    settings = SidecarSettings("sidecars", frames=9, height=32, width=48, fps=None)
    bucket = Bucket(32, 48, 9)

    def video(fps: float) -> SampleEntry:
        return SampleEntry("shard-000000.tar", "k", "k.mp4", 0, 0, 0, 0, "video", 96, 64, 40, fps)

    assert [settings.same_clip(video(fps), bucket, 12.0) for fps in (8.0, 12.0, 24.0)] == [True, True, False]
    assert not settings.same_clip(video(12.0), Bucket(32, 48, 5), 12.0)
    assert not settings.same_clip(video(12.0), Bucket(48, 48, 9), 12.0)


def test_later_pipeline_stages_get_no_condition(paths, tmp_path, single_process_world):  # noqa: F811
    """Only the first stage embeds the condition (with the depth of the revealed frame, from a real
    depth model); a later stage's step builds none and sees the same latents and text."""
    save_depth(tmp_path / "depth")
    with_depth = build_encoders(tiny_config({**paths, "depth_path": str(tmp_path / "depth")}), TEXT_WIDTH, CPU)
    clip = Clip(pixels=torch.rand(3, 5, 32, 32) * 2 - 1, caption="a clip", key="real")
    batch = collate([build_task_sample(clip, "i2v", torch.Generator().manual_seed(0))], [0])
    assert batch.depth_to_estimate == [[0]]
    config = preset_config("tiny", pipeline_dtype=torch.float32)
    later = MfMDiT(config, local_layer_spec(), pre_process=False)
    later.set_input_tensor(torch.zeros(2 * 2 * 2 + 1, 1, config.hidden_size))  # (latent tokens + c row, B, D)
    first_inputs, _ = model_inputs(with_depth, batch, MfMDiT(config, local_layer_spec()))
    later_inputs, _ = model_inputs(with_depth, batch, later)
    assert first_inputs[4][0, 3, 0].abs().sum() > 0 and later_inputs[4] is None
    assert torch.equal(first_inputs[0], later_inputs[0]) and torch.equal(first_inputs[2], later_inputs[2])
