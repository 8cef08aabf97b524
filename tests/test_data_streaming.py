"""The shard loader: planning (DP split, epoch coverage, token budgets, stages, resume) on a
catalog, then decoding real media the test writes, the exact packed transport from workers, and
training from shards with an exact resume."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mfm.data.shards.buckets import Bucket
from megatron_mfm.data.shards.catalog import SampleEntry, load_catalog
from megatron_mfm.data.batch import MicroBatch, collate
from megatron_mfm.data.shards.planner import MicroBatchPlanner
from megatron_mfm.data.shards.stages import StageConfig, StageSchedule
from megatron_mfm.data.shards.streaming import DecodedMicroBatch, ShardDataConfig, ShardLoader, pack_frames
from megatron_mfm.tasks.builders import IMAGE_TASKS, TASKS, Clip, build_task_sample
from megatron_mfm.tasks.mixture import TaskMixtureConfig
from megatron_mfm.utils.media import write_mp4
from signal_masks import blocks_sigterm
from test_data_shards import moving_square
from test_training import losses, records, train

ROOT = Path(__file__).resolve().parents[1]


def fake_catalog(shards: int = 5, per_shard: int = 8) -> list[SampleEntry]:
    """Mixed images and videos of three aspect ratios and several lengths (no files needed)."""
    entries = []
    for s in range(shards):
        for k in range(per_shard):
            n = s * per_shard + k
            kind = "image" if n % 3 == 0 else "video"
            width, height = [(96, 64), (64, 96), (64, 64)][n % 3 if kind == "video" else (n // 3) % 3]
            entries.append(SampleEntry(f"shard-{s:06d}.tar", f"k{n}", f"k{n}.mp4", 0, 0, 0, 0, kind, width, height,
                                       1 if kind == "image" else 12 + 8 * (n % 4), 0.0 if kind == "image" else 16.0))
    return entries


def plan(planner: MicroBatchPlanner, steps: int, micro_batches: int) -> list[list]:
    return [[(mb.bucket, mb.entries, mb.sample_ids) for mb in planner.plan_step(micro_batches)] for _ in range(steps)]


def test_data_parallel_ranks_split_one_epoch_exactly():
    catalog = fake_catalog()
    stage = StageConfig(resolutions=[[32, 48], [48, 32], [32, 32]], frames=[5, 9])
    planner = MicroBatchPlanner(catalog, StageSchedule([stage]), seed=3, fps=16, shuffle_window=16, micro_batch_size=1)
    dp = 2
    steps = plan(planner, len(catalog) // 4, micro_batches=2 * dp)  # micro_batch_size 1: nothing waits
    ranks = [[i for step in steps for _, entries, _ in step[r::dp] for i in entries] for r in range(dp)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(len(catalog)))  # each sample once per epoch
    for step in steps:
        for bucket, entries, _ in step:
            entry = catalog[entries[0]]
            assert bucket.frames == 1 if entry.is_image else bucket.frames == (9 if entry.frames >= 9 else 5)
            portrait, landscape = entry.height > entry.width, entry.width > entry.height
            assert (bucket.height > bucket.width) == portrait and (bucket.width > bucket.height) == landscape
    ids = [i for step in steps for _, _, sample_ids in step for i in sample_ids]
    assert ids == list(range(len(catalog)))


def test_token_budget_buckets_and_joint_image_video_steps():
    catalog = fake_catalog(shards=6)
    stage = StageConfig(resolutions=[[32, 48], [48, 32], [32, 32]], frames=[5, 9], token_budget=40)
    planner = MicroBatchPlanner(catalog, StageSchedule([stage]), seed=0, fps=16, shuffle_window=64, micro_batch_size=1)
    steps = plan(planner, 12, micro_batches=4)
    mixed = 0
    for step in steps:
        for bucket, entries, _ in step:
            assert {planner._bucket_of(i) for i in entries} == {bucket}  # one shape per micro-batch
            assert len(entries) == max(1, 40 // bucket.tokens)  # as many as fit the budget
            assert len(entries) * bucket.tokens <= 40 or len(entries) == 1
        mixed += len({bucket.frames == 1 for bucket, _, _ in step}) == 2
    assert mixed > 0  # images and videos train in the same step


def test_resume_mid_stage_replays_exactly_and_stages_switch_at_boundaries():
    catalog = fake_catalog()
    stages = [StageConfig(name="low", iterations=3, resolutions=[[32, 32]], frames=[5], token_budget=24),
              StageConfig(name="high", resolutions=[[48, 48], [32, 64]], frames=[9], token_budget=60)]

    def planner() -> MicroBatchPlanner:
        return MicroBatchPlanner(catalog, StageSchedule(stages), seed=7, fps=16, shuffle_window=8, micro_batch_size=1)

    reference, states = planner(), []
    steps = []
    for _ in range(7):
        states.append(reference.state_dict())
        steps.append(plan(reference, 1, micro_batches=3)[0])
    assert {b.height for step in steps[:3] for b, _, _ in step} == {32}
    assert {(b.height, b.width) for step in steps[3:] for b, _, _ in step} <= {(48, 48), (32, 64)}
    for resume_at in (2, 4):  # inside the first stage, inside the second
        resumed = planner()
        resumed.load_state_dict(json.loads(json.dumps(states[resume_at])))  # survives serialisation
        assert plan(resumed, 7 - resume_at, micro_batches=3) == steps[resume_at:]
    all_planned = [i for step in steps for _, _, ids in step for i in ids]
    assert len(all_planned) == len(set(all_planned))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """Real shards: H.264 clips of three aspect ratios and two lengths, JPEG and PNG images."""
    media = tmp_path_factory.mktemp("stream_media")
    sizes = [(64, 96), (96, 64), (64, 64)]
    for i in range(6):
        h, w = sizes[i % 3]
        colour = tuple(float(c) for c in torch.linspace(-1, 1, 3).roll(i))
        write_mp4(media / f"clip{i}.mp4", moving_square(24 if i % 2 else 40, h, w, colour), fps=16)
        (media / f"clip{i}.txt").write_text(f"clip number {i}")
    for i, suffix in enumerate(("jpg", "png", "jpg")):
        Image.fromarray(np.full((64, 64 + 32 * i, 3), 60 * i, np.uint8)).save(media / f"image{i}.{suffix}")
        (media / f"image{i}.txt").write_text(f"image number {i}")
    out = tmp_path_factory.mktemp("stream_shards")
    subprocess.run([sys.executable, str(ROOT / "data_prep" / "make_shards.py"), "--input", str(media), "--output",
                    str(out), "--shard-size-mb", "0.01", "--workers", "1", "--min-frames", "17", "--min-side", "64"],
                   check=True, capture_output=True, timeout=300)
    return out


STAGES = [StageConfig(name="a", iterations=2, resolutions=[[32, 48], [48, 32], [32, 32]], frames=[9, 17],
                      token_budget=60)]


def loader(shard_dir: Path, dp_rank: int, workers: int = 0, stages: list[StageConfig] = STAGES) -> ShardLoader:
    config = ShardDataConfig(path=str(shard_dir), fps=16, shuffle_window=4, workers=workers, prefetch_steps=1)
    return ShardLoader(config, stages, TaskMixtureConfig(), micro_batch_size=1, global_batch_size=4,
                       dp_rank=dp_rank, dp_size=2, seed=11)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Float32 tensors equal bit for bit (torch.equal takes -0.0 for 0.0)."""
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def assert_same_batches(got: list[MicroBatch], expected: list[MicroBatch]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert same_bits(a.pixels, b.pixels) and same_bits(a.condition, b.condition)
        assert a.tasks == b.tasks and a.prompts == b.prompts and torch.equal(a.sample_ids, b.sample_ids)
        assert a.depth_to_estimate == b.depth_to_estimate and torch.equal(a.motion_score, b.motion_score)


def test_shard_loader_decodes_disjoint_deterministic_resumable_batches(shard_dir):
    catalog = load_catalog(shard_dir)
    assert len(catalog) == 9 and len(list(shard_dir.glob("shard-*.json"))) == len(list(shard_dir.glob("*.tar")))
    ranks = [loader(shard_dir, r) for r in range(2)]
    seen = [set(), set()]
    for _ in range(3):
        for r, rank_loader in enumerate(ranks):
            for batch in rank_loader.next_global_batch():
                f, h, w = batch.pixels.shape[2:]
                assert batch.condition.shape[2:] == (f, h, w) and batch.pixels.abs().max() <= 1
                assert len(batch.prompts) * Bucket(h, w, f).tokens <= 60 or len(batch.prompts) == 1
                seen[r].update(batch.sample_ids.tolist())
    assert seen[0] and seen[1] and not seen[0] & seen[1]

    state = ranks[0].state_dict()
    expected = ranks[0].next_global_batch()
    with_workers = loader(shard_dir, 0, workers=2)
    try:
        with_workers.load_state_dict(json.loads(json.dumps(state)))
        got = with_workers.next_global_batch()
        # born shielded: a pre-emption signal to every process leaves them to the training process
        assert all(blocks_sigterm(worker.pid) for worker in with_workers._pool._processes.values())
    finally:
        with_workers.close()
    assert_same_batches(got, expected)  # packed by the workers (resized media: float32 pixels, uint8 mask)


def test_packed_transport_gives_every_task_back_bit_for_bit():
    """What a worker pickles (``DecodedMicroBatch.__getstate__``) unpickles to the very float
    tensors the task builders made, for every task, for pixels on 8-bit levels (shipped as uint8)
    and off them (a resized clip: float32); the mask always travels as uint8."""
    levels = torch.randint(0, 256, (3, 9, 16, 24)).float() / 127.5 - 1  # as the decoders map uint8
    resized = torch.nn.functional.interpolate(levels[:, :, None], size=(1, 12, 20), mode="trilinear")[:, :, 0]
    for pixels in (levels, resized):
        for task in TASKS:
            frames = pixels[:, :1] if task in IMAGE_TASKS else pixels
            clip = Clip(frames, "a caption", edit_source=frames.flip(-1) if task == "vedit" else None)
            samples = [build_task_sample(clip, task, torch.Generator().manual_seed(seed)) for seed in (0, 1)]
            decoded = DecodedMicroBatch(collate(samples, [0, 1]), [], [])
            packed = pack_frames(decoded.batch.pixels, decoded.batch.condition)
            assert packed["pixels"].dtype == (torch.uint8 if pixels is levels else torch.float32)
            assert packed["mask"].dtype == torch.uint8 and packed["depth"] is None
            degraded = task in ("isr", "vsr", "icolor", "vcolor", "vedit")
            assert (packed["rgb"] is None) != degraded, task
            shipped = sum(t.numel() * t.element_size() for t in packed.values() if t is not None)
            bytes_per_pixel = shipped / (2 * frames[0].numel())  # float32 pixels + condition: 32
            # uint8 pixels and mask; an edit source on levels as uint8 too; degraded RGB as float32
            expected = {"levels": 16 if degraded else 4, "resized": 25 if degraded else 13}
            expected["levels"] -= 9 * (task == "vedit")
            assert bytes_per_pixel == expected["levels" if pixels is levels else "resized"], task
            assert_same_batches([pickle.loads(pickle.dumps(decoded)).batch], [decoded.batch])


@pytest.fixture(scope="module")
def level_shard_dir(tmp_path_factory) -> Path:
    """Media already at their bucket's size: decoding resizes nothing, pixels stay on 8-bit levels."""
    media = tmp_path_factory.mktemp("level_media")
    for i in range(2):
        write_mp4(media / f"clip{i}.mp4", moving_square(24, 32, 48, (1.0, -1.0, 0.5)).roll(i, dims=-1), fps=16)
        (media / f"clip{i}.txt").write_text(f"clip number {i}")
    Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)).save(media / "image.png")
    (media / "image.txt").write_text("a ramp")
    out = tmp_path_factory.mktemp("level_shards")
    subprocess.run([sys.executable, str(ROOT / "data_prep" / "make_shards.py"), "--input", str(media), "--output",
                    str(out), "--workers", "1", "--min-frames", "17", "--min-side", "16"],
                   check=True, capture_output=True, timeout=300)
    return out


def test_workers_ship_uint8_frames_and_deliver_the_same_bits(level_shard_dir):
    """0 workers (no pickling: the float path as it always was) and 2 worker processes (frames
    packed to uint8) give the trainer bit-identical micro-batches."""
    stages = [StageConfig(resolutions=[[32, 48], [32, 32]], frames=[9])]
    batches = {}
    for workers in (0, 2):
        rank_loader = loader(level_shard_dir, 0, workers=workers, stages=stages)
        try:
            batches[workers] = [b for _ in range(3) for b in rank_loader.next_global_batch()]
        finally:
            rank_loader.close()
    assert {b.pixels.shape[2] for b in batches[0]} == {1, 9}  # images and videos
    for batch in batches[0]:
        packed = pack_frames(batch.pixels, batch.condition)
        assert packed["pixels"].dtype == torch.uint8 and packed["mask"].dtype == torch.uint8
    assert_same_batches(batches[2], batches[0])


def test_undecodable_sample_is_replaced_and_counted(shard_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in shard_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    victim = next(e for e in load_catalog(broken) if not e.is_image)
    with open(broken / victim.shard, "r+b") as shard:  # same size, garbage content
        shard.seek(victim.media_offset)
        shard.write(b"\0" * victim.media_size)
    one_per_micro_batch = [StageConfig(resolutions=[[32, 48], [48, 32], [32, 32]], frames=[9, 17])]
    for stages in (STAGES, one_per_micro_batch):  # the victim shares a micro-batch / is one alone
        ranks = [loader(broken, rank, stages=stages) for rank in range(2)]
        for _ in range(6):
            for rank_loader in ranks:
                batches = rank_loader.next_global_batch()
                assert len(batches) == 2 and all(torch.isfinite(b.pixels).all() for b in batches)
        assert sum(rank_loader.skipped_samples for rank_loader in ranks) >= 1


def test_training_on_shards_resumes_exactly_across_a_stage_switch(shard_dir, tmp_path):
    stages = ("data.stages=[{name: low, iterations: 2, resolutions: [[32, 32], [32, 48]], frames: [9], "
              "token_budget: 32}, {name: high, resolutions: [[48, 48]], frames: [17], token_budget: 0}]")
    common = ["data.source=shards", f"data.shards.path={shard_dir}", "data.shards.workers=1", stages,
              "train.micro_batch_size=1", "train.global_batch_size=2", "train.ema_decay=0",
              "validation.interval=1", "validation.num_samples=2", f"validation.shards_path={shard_dir}"]
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir(), part.mkdir()
    train(full, *common, "train.iterations=3")
    train(part, *common, "train.iterations=3", "train.stop_iteration=1", f"checkpoint.save={part / 'ckpt'}")
    train(part, *common, "train.iterations=3", f"checkpoint.load={part / 'ckpt'}")
    reference, resumed = losses(full), losses(part)
    assert sorted(reference) == [1, 2, 3]
    validated = [{r["iteration"]: r["val/loss"] for r in records(run, "val/loss")} for run in (full, part)]
    assert sorted(validated[0]) == [1, 2, 3]
    for iteration in (2, 3):
        assert resumed[iteration] == pytest.approx(reference[iteration], rel=1e-6, abs=1e-7)
        assert validated[1][iteration] == pytest.approx(validated[0][iteration], rel=1e-6)
