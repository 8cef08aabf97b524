"""Every MfM task builder: condition shape, which pixels are known, depth, prompt tags."""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.tasks import TASKS, Clip, TaskMixture, TaskMixtureConfig, build_task_sample
from megatron_mfm.tasks.builders import IMAGE_TASKS
from megatron_mfm.tasks.degradations import grayscale

F, H, W = 17, 32, 48


def make_clip(frames: int, with_edit: bool = False) -> Clip:
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, frames, H, W, generator=g) * 2 - 1
    depth = torch.rand(1, frames, H, W, generator=g) + 0.5  # strictly positive: visible where given
    edit = torch.rand(3, frames, H, W, generator=g) * 2 - 1 if with_edit else None
    return Clip(pixels=pixels, caption="A Red Ball", fps=24, depth=depth, edit_source=edit, key="k")


def build(task: str, seed: int = 0):
    clip = make_clip(1 if task in IMAGE_TASKS else F, with_edit=task == "vedit")
    sample = build_task_sample(clip, task, torch.Generator().manual_seed(seed))
    rgb, depth, mask = sample.condition[:3], sample.condition[3:4], sample.condition[4:5]
    assert sample.condition.shape == (5, *clip.pixels.shape[1:])
    assert torch.equal(sample.pixels, clip.pixels)
    assert torch.equal(rgb, rgb * mask), "rgb must be zero where the mask is 0"
    assert sample.prompt.endswith(f"#task: {sample.prompt.split('#task: ')[1]}")
    return clip, sample, rgb, depth, mask


@pytest.mark.parametrize("task", ["t2i", "t2v"])
def test_text_only_tasks_know_nothing(task):
    _, sample, rgb, depth, mask = build(task)
    assert mask.sum() == 0 and rgb.abs().sum() == 0 and depth.abs().sum() == 0
    assert sample.motion_score == (0.0 if task == "t2i" else 5.0)


@pytest.mark.parametrize(
    "task,known",
    [("i2v", [0]), ("itrans", [0, F - 1]), ("vexd", list(range(8))), ("vtrans", [0, 1, 2, 3, 4, 12, 13, 14, 15, 16])],
)
def test_generation_tasks_know_whole_frames_with_depth(task, known):
    clip, sample, rgb, depth, mask = build(task)
    frame_known = mask.flatten(2).amin(-1)[0]  # 1 where the whole frame is known
    assert frame_known.nonzero().flatten().tolist() == known
    assert mask.sum() == len(known) * H * W
    assert torch.equal(rgb[:, known], clip.pixels[:, known])
    assert torch.equal(depth[:, known], clip.depth[:, known])
    unknown = [f for f in range(F) if f not in known]
    assert depth[:, unknown].abs().sum() == 0


@pytest.mark.parametrize("task", ["isr", "vsr"])
def test_super_resolution_gives_a_blurred_full_frame(task):
    clip, _, rgb, depth, mask = build(task)
    assert mask.min() == 1 and depth.abs().sum() == 0
    error = (rgb - clip.pixels).abs().mean()
    assert 0.05 < error < 1.0  # degraded, yet the same picture
    # low-pass: neighbouring pixels differ far less than in the random-noise original
    assert (rgb[..., 1:] - rgb[..., :-1]).abs().mean() < 0.5 * (clip.pixels[..., 1:] - clip.pixels[..., :-1]).abs().mean()


@pytest.mark.parametrize("task", ["icolor", "vcolor"])
def test_colorization_gives_grey(task):
    clip, _, rgb, depth, mask = build(task)
    assert mask.min() == 1 and depth.abs().sum() == 0
    assert torch.allclose(rgb[0], rgb[1]) and torch.allclose(rgb[1], rgb[2])
    luma = 0.2989 * clip.pixels[0] + 0.587 * clip.pixels[1] + 0.114 * clip.pixels[2]
    assert torch.allclose(rgb[0], luma, atol=3e-4)  # luma weights sum to 0.9999


@pytest.mark.parametrize("task", ["iinp", "vinp"])
def test_inpainting_hides_a_region_in_every_frame(task):
    clip, _, rgb, depth, mask = build(task)
    hole = 1 - mask
    assert 0 < hole.mean() < 0.9 and depth.abs().sum() == 0
    assert torch.equal(mask, mask[:, :1].expand_as(mask)), "same mask in every frame"
    assert torch.equal(rgb, clip.pixels * mask)


@pytest.mark.parametrize("task", ["ioutp", "voutp"])
def test_outpainting_knows_a_centre_rectangle(task):
    _, _, _, _, mask = build(task)
    rows, cols = mask[0, 0].amax(1).nonzero().flatten(), mask[0, 0].amax(0).nonzero().flatten()
    box = mask[0, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.min() == 1, "known region is one rectangle"
    assert mask.mean() < 0.95, "something is left to generate"


def test_vedit_conditions_on_the_source_clip():
    clip, _, rgb, depth, mask = build("vedit")
    assert mask.min() == 1 and depth.abs().sum() == 0
    assert torch.equal(rgb, clip.edit_source)
    with pytest.raises(ValueError, match="edit_source"):
        build_task_sample(make_clip(F), "vedit", torch.Generator())


def test_prompt_tags_and_kind_checks():
    _, sample, *_ = build("i2v")
    assert sample.prompt == "a red ball #fps: 24. #task: image-to-video"
    with pytest.raises(ValueError, match="needs a video"):
        build_task_sample(make_clip(1), "t2v", torch.Generator())
    with pytest.raises(ValueError, match="unknown task"):
        build_task_sample(make_clip(F), "t3v", torch.Generator())


def test_every_task_has_a_test():
    covered = {"t2i", "t2v", "i2v", "itrans", "vexd", "vtrans", "isr", "vsr", "icolor", "vcolor",
               "iinp", "vinp", "ioutp", "voutp", "vedit"}
    assert covered == set(TASKS)


def test_mixture_respects_weights_kinds_and_dropouts():
    mixture = TaskMixture(TaskMixtureConfig(weights={"t2v": 3.0, "i2v": 1.0, "t2i": 1.0}, text_dropout=0.5,
                                            depth_dropout=1.0))
    g = torch.Generator().manual_seed(0)
    video, image = make_clip(F), make_clip(1)
    draws = [mixture.sample(video, g) for _ in range(400)]
    share_t2v = sum(s.task == "t2v" for s in draws) / len(draws)
    assert 0.68 < share_t2v < 0.82  # 3:1
    assert all(mixture.sample(image, g).task == "t2i" for _ in range(20))
    empty = sum(s.prompt == "" for s in draws) / len(draws)
    assert 0.4 < empty < 0.6
    assert all(s.condition[3].abs().sum() == 0 for s in draws), "depth dropout 1.0 zeroes depth"
    with pytest.raises(ValueError, match="unknown tasks"):
        TaskMixtureConfig(weights={"t2x": 1.0})
    with pytest.raises(ValueError, match="no task"):
        TaskMixture(TaskMixtureConfig(weights={"t2v": 1.0})).choose(image, g)


def test_grayscale_of_grey_is_identity():
    grey = torch.rand(1, 2, 4, 4).expand(3, 2, 4, 4) * 2 - 1
    assert torch.allclose(grayscale(grey), grey, atol=3e-4)
