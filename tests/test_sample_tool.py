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

from megatron_mfm.tasks.user_inputs import Geometry, TaskInputs, prepare_inputs
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
    """A landscape image, a mask whose white box is the known region, and two short videos."""
    folder = tmp_path_factory.mktemp("media")
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (24, 40, 3), generator=g, dtype=torch.uint8).numpy()).save(folder / "photo.png")
    known = np.zeros((24, 40), np.uint8)
    known[6:18, 10:30] = 255
    Image.fromarray(known).save(folder / "known.png")
    for name, seed in (("a.mp4", 1), ("b.mp4", 2)):
        frames = torch.rand(3, 11, 32, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        write_mp4(folder / name, frames)
    return folder


def test_files_become_the_task_conditions(media):
    """Inputs keep their aspect ratio in the canvas (letterboxed), white mask pixels are known,
    and vtrans puts video A's last and video B's first 8 frames at the ends."""
    geometry = Geometry(frames=17, height=32, width=48)
    i2v = prepare_inputs(TaskInputs("i2v", images=[str(media / "photo.png")]), "go", geometry).sample
    # 40x24 scaled by min(48/40, 32/24) = 1.2 -> 48x29, floored to 48x16, pasted 8 rows down
    assert i2v.condition[4, 0, 8:24].min() == 1 and i2v.condition[4, 0, :8].max() == 0
    assert i2v.condition[4, 1:].max() == 0 and i2v.condition[:3, 1:].abs().max() == 0
    assert i2v.depth_to_estimate == [0] and i2v.motion_score == 5.0 and i2v.prompt == "go"

    inpaint = prepare_inputs(TaskInputs("iinp", images=[str(media / "photo.png")], mask=str(media / "known.png")),
                             "", geometry).sample
    known = inpaint.condition[4, 0]
    assert known[16, 24] == 1 and known[9, 2] == 0, "white is the known region"
    assert torch.equal(inpaint.condition[:3], inpaint.pixels * known) and inpaint.motion_score == 0.0
    flipped = prepare_inputs(TaskInputs("iinp", images=[str(media / "photo.png")], mask=str(media / "known.png"),
                                        mask_white="generate"), "", geometry).sample
    assert flipped.condition[4, 0, 16, 24] == 0 and flipped.condition[4, 0, 9, 2] == 1

    videos = [str(media / "a.mp4"), str(media / "b.mp4")]
    vtrans = prepare_inputs(TaskInputs("vtrans", videos=videos), "", geometry)
    first, second = read_video(videos[0]), read_video(videos[1])
    signed = lambda frames: torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1  # noqa: E731
    assert (vtrans.sample.pixels[:, :8] - signed(first[-8:])).abs().max() < 1e-6
    assert (vtrans.sample.pixels[:, -8:] - signed(second[:8])).abs().max() < 1e-6
    assert vtrans.sample.condition[4, 8:-8].max() == 0 and vtrans.before.shape[1] == 3 and vtrans.after.shape[1] == 3
    assert vtrans.assemble(vtrans.sample.pixels).shape[1] == 3 + 17 + 3

    with pytest.raises(ValueError, match="takes 2 image"):
        TaskInputs("itrans", images=[str(media / "photo.png")])
    with pytest.raises(ValueError, match="raise --frames"):
        prepare_inputs(TaskInputs("vexd", videos=videos[:1]), "", Geometry(frames=5, height=32, width=48))


def test_prompt_file_writes_one_output_per_request(media, tmp_path):
    from megatron_mfm.export.official_io import write_official
    from megatron_mfm.model.config import make_config, to_official_config

    config = make_config(**megatron_config_kwargs())
    reference = make_reference(seed=2)
    write_official(tmp_path / "official", to_official_config(config), reference.state_dict())
    prompts = media / "prompts.jsonl"
    prompts.write_text("\n".join([
        "a plain prompt",
        json.dumps({"prompt": "fill the hole", "task": "iinp", "image": "photo.png", "mask": "known.png", "seed": 3}),
        "",
        json.dumps({"prompt": "extend it", "task": "vexd", "video": "a.mp4"}),
    ]) + "\n")
    result = subprocess.run(
        [sys.executable, str(TOOL), "--official", str(tmp_path / "official"), "--prompt-file", str(prompts),
         "--tasks", "t2i", "--output", str(tmp_path / "out"), "--steps", "2", "--frames", "9", "--height", "32",
         "--width", "48"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["0000_t2i.png", "0001_iinp.png", "0002_vexd.mp4", "contact_sheet.png"]
    assert read_video(tmp_path / "out" / "0001_iinp.png").shape == (1, 32, 48, 3)
    # vexd: the video's 3 frames before its last 8, then the 9 generated ones (a 12-frame total loses its first 3)
    assert read_video(tmp_path / "out" / "0002_vexd.mp4").shape == (9, 32, 48, 3)
    assert "fill the hole #FPS: 16. #task: image inpainting" in result.stdout


def test_bad_inputs_name_the_flag_or_file(media, tmp_path):
    tool = sample_tool
    common = ["--official", "x", "--output", str(tmp_path)]
    with pytest.raises(ValueError, match="--image .*none of --tasks t2v"):
        tool.requests_of(tool.parse_args([*common, "--tasks", "t2v", "--image", str(media / "photo.png")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "task": "i2v", "image": "missing.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: .*missing.png"):
        tool.requests_of(tool.parse_args([*common, "--prompt-file", str(bad)]))


def test_refuses_a_used_output_folder_and_a_wrong_source(tmp_path):
    """Exit non-zero with one line, before any model is built: an output folder holding files
    (unless --overwrite), a missing --load, and --load given an official folder."""
    from megatron_mfm.export.official_io import write_official
    from megatron_mfm.model.config import make_config, to_official_config

    official = tmp_path / "official"
    write_official(official, to_official_config(make_config(**megatron_config_kwargs())), make_reference(seed=2).state_dict())
    used = tmp_path / "used"
    used.mkdir()
    (used / "t2v.mp4").write_bytes(b"earlier sample")
    cases = {
        ("--official", str(official), "--output", str(used)): "already holds files: choose a new folder or pass --overwrite",
        ("--load", str(tmp_path / "nonexistent"), "--output", str(tmp_path / "o1")): "no such file or folder",
        ("--load", str(official), "--output", str(tmp_path / "o2")): f"use --official {official}",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:  # SystemExit(str): one line on stderr, exit status 1
            sample_tool.main(list(argv))
        assert isinstance(exit_info.value.code, str) and message in exit_info.value.code
        assert "\n" not in exit_info.value.code
    assert (used / "t2v.mp4").read_bytes() == b"earlier sample"


def test_reference_clips_follow_the_training_runs_scenes(tmp_path):
    """--data-config: a task given no file samples from a synthetic clip of the run's own scenes
    (the demo trains on one shape on a plain or gradient ground; the built-in mix has up to three
    shapes on four kinds of ground), and a bad file is named."""
    common = ["--official", "x", "--output", str(tmp_path), "--tasks", "i2v", "--frames", "5", "--height", "32",
              "--width", "32"]
    demo = ["--data-config", str(ROOT / "examples" / "tiny_cpu.yaml")]

    def captions(extra: list[str]) -> set[str]:
        args = [sample_tool.parse_args([*common, *extra, "--synthetic-index", str(i)]) for i in range(8)]
        return {sample_tool.prepared_sample(TaskInputs("i2v"), a).sample.prompt.split(" #")[0] for a in args}

    patterned = ("striped", "checkered")  # grounds the demo's scenes leave out
    assert all(" and " not in c and not any(p in c for p in patterned) for c in captions(demo)), captions(demo)
    default = captions([])
    assert any(" and " in c for c in default) and any(p in c for c in default for p in patterned), default
    with pytest.raises(SystemExit):
        sample_tool.parse_args([*common, "--data-config", str(tmp_path / "missing.yaml")])
