"""tools/sample.py: context-parallel sampling equals one process, user files become the task
conditions the builders define, and a prompt file writes one mp4 or PNG per request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mfm.tasks.user_inputs import TaskInputs, read_clip, read_image, task_sample_from_inputs
from megatron_mfm.tasks.builders import transition_frames
from megatron_mfm.utils.media import read_video, write_mp4
from tools import sample as sample_tool
from mfm_cases import make_reference, megatron_config_kwargs

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "sample.py"


def _sample(context_parallel: int) -> torch.Tensor:
    """A guided i2v sample of the tiny reference weights at this context-parallel size."""
    from megatron_mfm.encoders.interface import builtin_encoders
    from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
    from megatron_mfm.diffusion.generation import SamplingConfig, generate, task_sample_for
    from megatron_mfm.export.key_map import from_official
    from megatron_mfm.checkpoint.model_state import fill_from_global
    from megatron_mfm.model import MfMDiT, local_layer_spec
    from megatron_mfm.model.config import make_config

    config = make_config(**megatron_config_kwargs(), context_parallel_size=context_parallel)
    model = MfMDiT(config, local_layer_spec()).eval()
    fill_from_global(model, from_official(make_reference(seed=5).state_dict(), config))
    # 9 frames at 16x48: a 3x1x3 token grid, 9 tokens, so CP2 pads one row.
    clip = SyntheticVideoDataset(SyntheticConfig(frames=9, height=16, width=48)).clip(7, is_image=False)
    sampling = SamplingConfig(steps=2, guidance_scale=4.0, negative_prompt="blurry")
    return generate(model, builtin_encoders(config.text_hidden_size), task_sample_for(clip, "i2v"), sampling)


def _context_parallel_then_single() -> tuple[torch.Tensor, torch.Tensor]:
    from megatron.core import parallel_state

    from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(context_parallel_size=2)
    split = _sample(context_parallel=2)
    parallel_state.destroy_model_parallel()
    initialize_parallel(context_parallel_size=1)
    whole = _sample(context_parallel=1)
    destroy_parallel()
    return split, whole


def test_context_parallel_sampling_matches_one_process():
    from distributed import run_on_ranks

    results = run_on_ranks(2, _context_parallel_then_single)
    (split0, whole), (split1, _) = results
    assert torch.equal(split0, split1), "every CP rank holds the same clip"
    assert whole.abs().max() > 0.05, "the sample is not trivially zero"
    assert ((split0 - whole).norm() / whole.norm()).item() < 1e-5


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """An image, a mask whose white box is the hole, and two short videos."""
    folder = tmp_path_factory.mktemp("media")
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (24, 40, 3), generator=g, dtype=torch.uint8).numpy()).save(folder / "photo.png")
    hole = np.zeros((24, 40), np.uint8)
    hole[6:18, 10:30] = 255
    Image.fromarray(hole).save(folder / "hole.png")
    for name, seed in (("a.mp4", 1), ("b.mp4", 2)):
        frames = torch.rand(3, 7, 32, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        write_mp4(folder / name, frames)
    return folder


def test_files_become_the_task_conditions(media):
    size = dict(frames=9, height=32, width=48, fps=16.0)
    image = read_image(str(media / "photo.png"), 32, 48)

    i2v = task_sample_from_inputs(TaskInputs("i2v", "go", images=[str(media / "photo.png")]), **size)
    assert torch.equal(i2v.condition[:3, :1], image) and i2v.condition[:3, 1:].abs().max() == 0
    assert i2v.condition[4, 0].min() == 1 and i2v.condition[4, 1:].max() == 0
    assert i2v.prompt == "go #fps: 16. #task: image-to-video" and i2v.motion_score == 5.0

    inpaint = task_sample_from_inputs(
        TaskInputs("iinp", images=[str(media / "photo.png")], mask=str(media / "hole.png")), **size)
    known = inpaint.condition[4, 0]
    assert known[0, 0] == 1 and known[16, 24] == 0, "white is the region to generate"
    assert torch.equal(inpaint.condition[:3], image * known) and inpaint.motion_score == 0.0
    kept = task_sample_from_inputs(
        TaskInputs("iinp", images=[str(media / "photo.png")], mask=str(media / "hole.png"), mask_white="keep"), **size)
    assert torch.equal(kept.condition[4], 1 - known[None])

    videos = [str(media / "a.mp4"), str(media / "b.mp4")]
    vtrans = task_sample_from_inputs(TaskInputs("vtrans", videos=videos), **size)
    k = transition_frames(9)
    assert torch.equal(vtrans.condition[:3, :k], read_clip(videos[0], 32, 48)[:, -k:])
    assert torch.equal(vtrans.condition[:3, -k:], read_clip(videos[1], 32, 48)[:, :k])
    assert vtrans.condition[4, k:-k].max() == 0

    with pytest.raises(ValueError, match="takes 2 image"):
        TaskInputs("itrans", images=[str(media / "photo.png")])
    with pytest.raises(ValueError, match="a.mp4: 7 frames"):
        task_sample_from_inputs(TaskInputs("vsr", videos=videos[:1]), **size)


def test_prompt_file_writes_one_output_per_request(media, tmp_path):
    from megatron_mfm.export.official_io import write_official
    from megatron_mfm.model.config import make_config, to_official_config

    config = make_config(**megatron_config_kwargs())
    reference = make_reference(seed=2)
    write_official(tmp_path / "official", to_official_config(config), reference.state_dict())
    prompts = media / "prompts.jsonl"
    prompts.write_text("\n".join([
        "a plain prompt",
        json.dumps({"prompt": "fill the hole", "task": "iinp", "image": "photo.png", "mask": "hole.png", "seed": 3}),
        "",
        json.dumps({"prompt": "extend it", "task": "vexd", "video": "a.mp4"}),
    ]) + "\n")
    result = subprocess.run(
        [sys.executable, str(TOOL), "--official", str(tmp_path / "official"), "--prompt-file", str(prompts),
         "--tasks", "t2i", "--output", str(tmp_path / "out"), "--steps", "2", "--frames", "5", "--height", "32",
         "--width", "48"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["0000_t2i.png", "0001_iinp.png", "0002_vexd.mp4", "contact_sheet.png"]
    assert read_video(tmp_path / "out" / "0001_iinp.png").shape == (1, 32, 48, 3)
    assert read_video(tmp_path / "out" / "0002_vexd.mp4").shape == (5, 32, 48, 3)
    assert "fill the hole #fps: 16. #task: image inpainting" in result.stdout


def test_bad_inputs_name_the_flag_or_file(media, tmp_path):
    tool = sample_tool
    common = ["--official", "x", "--output", str(tmp_path)]
    with pytest.raises(ValueError, match="--image .*none of --tasks t2v"):
        tool.requests_of(tool.parse_args([*common, "--tasks", "t2v", "--image", str(media / "photo.png")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "task": "i2v", "image": "missing.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: .*missing.png"):
        tool.requests_of(tool.parse_args([*common, "--prompt-file", str(bad)]))
