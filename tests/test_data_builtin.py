"""The synthetic dataset and the built-in stand-in encoders."""

from __future__ import annotations

import os
import signal
import sys
import time
import zlib

import pytest
import torch

from megatron_mfm.encoders.builtin import HashedTextEncoder, LowFrequencyVideoCodec, _low_frequency_basis
from megatron_mfm.data.loader import SyntheticLoader
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
from megatron_mfm.tasks.mixture import TaskMixture, TaskMixtureConfig
from signal_masks import blocks_sigterm


def test_synthetic_samples_are_deterministic_and_described():
    data = SyntheticVideoDataset(SyntheticConfig(frames=9, height=32, width=48, image_fraction=0.5, seed=3))
    a, b = data[7], data[7]
    assert torch.equal(a.pixels, b.pixels) and a.caption == b.caption
    kinds = {data[i].pixels.shape[1] for i in range(30)}
    assert kinds == {1, 9}
    video = next(data[i] for i in range(30) if not data[i].is_image)
    assert video.pixels.shape == (3, 9, 32, 48) and video.pixels.min() >= -1 and video.pixels.max() <= 1
    assert "moving" in video.caption and "background" in video.caption
    assert not torch.equal(video.pixels[:, 0], video.pixels[:, -1]), "shapes move"
    assert video.depth.shape == (1, 9, 32, 48) and video.depth.max() > 0.1, "shapes are nearer than the background"
    assert video.edit_source.shape == video.pixels.shape
    with pytest.raises(ValueError, match="4k\\+1"):
        SyntheticConfig(frames=8)


def test_codec_basis_is_orthonormal_and_roundtrips_its_range():
    basis = _low_frequency_basis()
    assert torch.allclose(basis @ basis.T, torch.eye(16), atol=1e-6)
    codec = LowFrequencyVideoCodec()
    latents = torch.randn(2, 16, 3, 4, 5) * 0.1
    pixels = codec.decode(latents)
    assert pixels.shape == (2, 3, 9, 32, 40)
    assert torch.allclose(codec.encode(pixels), latents, atol=1e-5)


def test_codec_keeps_low_frequencies_of_real_frames():
    clip = SyntheticVideoDataset(SyntheticConfig(frames=5, height=64, width=64, image_fraction=0.0))[0]
    codec = LowFrequencyVideoCodec()
    latents = codec.encode(clip.pixels[None])
    assert latents.shape == (1, 16, 2, 8, 8)
    recon = codec.decode(latents)[0]
    assert (recon[:, 0] - clip.pixels[:, 0]).abs().mean() < 0.25  # a blurred, recognisable first frame


def test_text_encoder_masks_padding_and_separates_prompts():
    encode = HashedTextEncoder(width=32)
    states, mask = encode(["a red circle", "a blue square moving left"])
    assert states.shape == (2, 77, 32) and mask[0].sum() == 4 and mask[1].sum() == 6
    assert states[0, 4:].abs().sum() == 0
    again, _ = encode(["a red circle"])
    assert torch.equal(again[0], states[0])
    assert not torch.allclose(states[0, 1], states[1, 1]), "red and blue differ"


def test_text_encoder_batch_is_each_word_vector_plus_its_position():
    """The batched gather gives, bit for bit, the definition: the word's hashed vector plus 0.1 x
    its position code, the end token after the words, zeros (+0.0) past it; long prompts cut."""
    encode = HashedTextEncoder(width=16, max_length=8)
    prompts = ["Red circle, moving!", "", "one two three four five six seven eight nine", "red red"]
    states, mask = encode(prompts)
    for i, prompt in enumerate(prompts):
        words = (HashedTextEncoder.tokenize(prompt) + ["</s>"])[:8]
        for j, word in enumerate(words):
            vector = torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(word.encode())))
            assert torch.equal(states[i, j], vector + 0.1 * encode.positions[j]), (prompt, word)
        assert mask[i].tolist() == [1.0] * len(words) + [0.0] * (8 - len(words))
        assert not torch.signbit(states[i, len(words):]).any() and not states[i, len(words):].any()


def test_text_encoder_cost_does_not_grow_with_the_batch():
    """A batch's prompts are one gather: the kernel-launching ops do not grow with the prompts
    (per-prompt ops, beside 45 ms of host-side math that the gather on the device removed, cost
    an H200 step of 64 clips ~50 ms)."""
    from benchmarks.op_counts import KernelCounter

    encode = HashedTextEncoder(width=16)
    encode(["a red circle moving left"] * 2)  # the words drawn once
    counts = []
    for batch in (2, 32):
        with KernelCounter() as counter:
            encode(["a red circle moving left"] * batch)
        counts.append(sum(counter.counts.values()))
    assert counts[0] == counts[1], counts


def _loader(workers: int, dp_rank: int = 0, pin=None, condition_dtype=torch.float32) -> SyntheticLoader:
    config = SyntheticConfig(frames=5, height=16, width=16, workers=workers, prefetch_steps=1)
    return SyntheticLoader(SyntheticVideoDataset(config), TaskMixture(TaskMixtureConfig()), micro_batch_size=2,
                           global_batch_size=8, dp_rank=dp_rank, dp_size=2, seed=3, pin=pin,
                           condition_dtype=condition_dtype)


def test_synthetic_workers_render_the_same_batches_ahead_and_resume():
    """Worker processes render the next steps off the critical path; the data (and a resume
    from a saved state, with renders in flight) stays what one process gives."""
    plain, ahead = _loader(workers=0, dp_rank=1), _loader(workers=2, dp_rank=1)
    try:
        for _ in range(2):
            for want, got in zip(plain.next_global_batch(), ahead.next_global_batch()):
                assert torch.equal(want.pixels, got.pixels) and torch.equal(want.condition, got.condition)
                assert want.tasks == got.tasks and want.prompts == got.prompts
        state = plain.state_dict()
        expected = plain.next_global_batch()
        ahead.next_global_batch()  # runs past the state, then resumes from it
        ahead.load_state_dict(state)
        resumed = ahead.next_global_batch()
        assert [b.sample_ids.tolist() for b in resumed] == [b.sample_ids.tolist() for b in expected]
        assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(resumed, expected))
    finally:
        ahead.close()


def test_workers_hand_over_conditions_in_the_compute_dtype_with_the_steps_bits():
    """A bf16 run's workers render the condition in bf16: half the bytes to hand over, pin and
    copy, and the very values the step's own cast to its compute dtype gave before."""
    plain, bf16 = _loader(workers=0), _loader(workers=2, condition_dtype=torch.bfloat16)
    try:
        for _ in range(2):
            for want, got in zip(plain.next_global_batch(), bf16.next_global_batch()):
                assert got.condition.dtype == torch.bfloat16 and want.condition.dtype == torch.float32
                assert torch.equal(got.condition, want.condition.to(torch.bfloat16))
                assert torch.equal(got.pixels, want.pixels)  # the codec encodes fp32 pixels
    finally:
        bf16.close()


def test_rendered_batches_are_pinned_off_the_training_thread_and_resume():
    """With ``pin`` (``MicroBatch.pinned`` on a GPU; here a copy, as pinning needs CUDA), every
    batch rendered ahead is copied on another thread before the step takes it; the data and a
    resume with copies in flight stay what one process gives."""
    import dataclasses
    import threading

    threads = []

    def copy(batch):
        threads.append(threading.current_thread())
        return dataclasses.replace(batch, pixels=batch.pixels.clone(), condition=batch.condition.clone())

    plain, pinned = _loader(workers=0), _loader(workers=2, pin=copy)
    try:
        for _ in range(2):
            for want, got in zip(plain.next_global_batch(), pinned.next_global_batch()):
                assert torch.equal(want.pixels, got.pixels) and torch.equal(want.condition, got.condition)
        assert threads and threading.main_thread() not in threads
        state = plain.state_dict()
        expected = plain.next_global_batch()
        pinned.next_global_batch()
        pinned.load_state_dict(state)
        assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(pinned.next_global_batch(), expected))
    finally:
        pinned.close()


def test_workers_outlive_a_preemption_signal():
    """A scheduler's SIGTERM reaches the whole process group (SLURM, ``timeout``): the workers
    must leave it to the training process, which saves and stops, needing one more step's data
    (an H200 run lost its checkpoint when they died first: BrokenProcessPool)."""
    plain, ahead = _loader(workers=0), _loader(workers=2)
    try:
        plain.next_global_batch(), ahead.next_global_batch()
        workers = list(ahead._pool._processes.values())
        assert len(workers) == 2
        assert all(blocks_sigterm(worker.pid) for worker in workers)  # from birth: no start-up window
        for worker in workers:
            os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.5)  # a worker that acts on it is gone by now
        assert all(worker.is_alive() for worker in workers)
        for want, got in zip(plain.next_global_batch(), ahead.next_global_batch()):
            assert torch.equal(want.pixels, got.pixels)
    finally:
        ahead.close()


def test_simpler_synthetic_scenes_and_their_validation():
    dataset = SyntheticVideoDataset(SyntheticConfig(frames=5, height=32, width=32, max_objects=1, backgrounds=["plain"]))
    for index in range(6):
        caption = dataset.clip(index, is_image=False).caption
        assert " and " not in caption and caption.endswith(" background") and len(caption.split(" on a ")[1].split()) == 2
    with pytest.raises(ValueError, match="data.synthetic.backgrounds"):
        SyntheticConfig(backgrounds=["dotted"])
    with pytest.raises(ValueError, match="data.synthetic.max_objects"):
        SyntheticConfig(max_objects=0)


def test_workers_render_whole_micro_batches_of_steps_ahead():
    """One large micro-batch a step (micro = global batch): every worker renders a whole one of the
    next steps (nothing to join in the training process); the data is what one process renders."""
    config = SyntheticConfig(frames=5, height=16, width=16, workers=3, prefetch_steps=0)
    make = lambda c: SyntheticLoader(SyntheticVideoDataset(c), TaskMixture(TaskMixtureConfig()),  # noqa: E731
                                     micro_batch_size=4, global_batch_size=4, dp_rank=0, dp_size=1, seed=5)
    plain, ahead = make(SyntheticConfig(frames=5, height=16, width=16)), make(config)
    try:
        assert ahead.ahead_steps == 2  # 3 steps in flight for 3 workers
        for _ in range(2):
            (want,), (got,) = plain.next_global_batch(), ahead.next_global_batch()
            assert torch.equal(want.pixels, got.pixels) and torch.equal(want.condition, got.condition)
            assert want.tasks == got.tasks and want.prompts == got.prompts and want.sample_ids.tolist() == got.sample_ids.tolist()
            assert torch.equal(want.motion_score, got.motion_score) and want.depth_to_estimate == got.depth_to_estimate
    finally:
        ahead.close()


def test_loader_receive_benchmark_times_a_gil_holding_consumer_and_restores_the_interval():
    """``benchmarks/loader_receive.py --consumer busy``: the data wait of a consumer that holds the
    GIL, at the switch interval asked for, which it gives back to the process afterwards."""
    from benchmarks.loader_receive import main

    before = sys.getswitchinterval()
    result = main(["--workers", "1", "--micro-batch-size", "2", "--frames", "5", "--size", "16", "--steps", "3",
                   "--step-ms", "20", "--consumer", "busy", "--switch-interval-ms", "0.5"])
    assert sys.getswitchinterval() == before
    assert (result["consumer"], result["switch_interval_ms"]) == ("busy", 0.5)
    # the consumer held the CPU for its 20 ms steps; a sleeping one would show ~0 here
    assert result["main_process_cpu_ms_per_step"] >= 15 and result["wall_ms_per_step"] >= 20
    assert 0 <= result["data_wait_ms_median"] <= result["wall_ms_per_step"]
