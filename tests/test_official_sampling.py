"""tools/sample.py on an official pipeline folder gives the official MfM pipeline's output at the
official script's defaults (scheduler, guidance, prompts, geometry, masks, depth, tiled decoding,
output frames), for all 15 tasks, in float32 on the CPU. Skipped without MFM_OFFICIAL_REPO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mfm.tasks.builders import TASKS
from megatron_mfm.utils.media import write_mp4
from official_pipeline import OFFICIAL_REPO, load_official_pipeline, run_official_script_step, write_pipeline_folder
from tools import sample as sample_tool

pytestmark = pytest.mark.skipif(not OFFICIAL_REPO, reason="set MFM_OFFICIAL_REPO to an official MfM checkout")

FRAMES, HEIGHT, WIDTH, STEPS, SEED = 9, 64, 96, 2, 7  # VAE tiles of 48x40 pixels: decoding is tiled
PROMPT = "a red square moving right"


def _video(path: Path, frames: int, seed: int, width: int = 48, height: int = 32) -> str:
    write_mp4(path, torch.rand(3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    return str(path)


def _image(path: Path, width: int, height: int, seed: int, mode: str = "RGB") -> str:
    g = torch.Generator().manual_seed(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).numpy(), mode).save(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    folders = write_pipeline_folder(root / "pipeline")
    media = root / "media"
    media.mkdir()
    mask = np.zeros((24, 40), np.uint8)
    mask[4:20, 6:30] = 255  # white: known
    Image.fromarray(mask).save(media / "known.png")
    files = {
        "landscape": _image(media / "landscape.png", 40, 24, 1), "portrait": _image(media / "portrait.png", 24, 40, 2),
        "a": _video(media / "a.mp4", 11, 3), "b": _video(media / "b.mp4", 10, 4), "mask": str(media / "known.png"),
        "mask_video": _video(media / "mask.mp4", 11, 5),
    }
    return folders, files, load_official_pipeline(Path(OFFICIAL_REPO), folders)


def _inputs(task: str, files: dict) -> tuple[list[str], str | None, str | None]:
    """(our flags, the official input_path, mask_path) of a task."""
    inputs = {
        "i2v": (["--image", files["portrait"]], files["portrait"], None),
        "itrans": (["--image", files["landscape"], "--image", files["portrait"]],
                   f"{files['landscape']};{files['portrait']}", None),
        "isr": (["--image", files["landscape"]], files["landscape"], None),
        "icolor": (["--image", files["landscape"]], files["landscape"], None),
        "iinp": (["--image", files["landscape"], "--mask", files["mask"]], files["landscape"], files["mask"]),
        "ioutp": (["--image", files["portrait"]], files["portrait"], None),
        "vexd": (["--video", files["a"]], files["a"], None),
        "vtrans": (["--video", files["a"], "--video", files["b"]], f"{files['a']};{files['b']}", None),
        "vinp": (["--video", files["a"], "--mask", files["mask_video"]], files["a"], files["mask_video"]),
    }
    if task in ("vsr", "vcolor", "voutp", "vedit"):
        return ["--video", files["b"]], files["b"], None
    return inputs.get(task, ([], None, None))


@pytest.mark.parametrize("task", TASKS)
def test_sample_equals_the_official_pipeline(task, setup, single_process_world, tmp_path):
    folders, files, official = setup
    flags, input_path, mask_path = _inputs(task, files)
    args = sample_tool.parse_args([
        "--official", folders["pipeline"], "--depth-path", folders["depth"], "--tasks", task, "--prompt", PROMPT,
        "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(STEPS),
        "--seed", str(SEED), "--output", str(tmp_path), *flags])
    sampler = sample_tool.load_sampler(args)
    request = sample_tool.requests_of(args)[0]
    ours = sample_tool.render(sampler, sample_tool.prepared_sample(request, args), args,
                              torch.Generator(sampler.device).manual_seed(SEED))
    expected = run_official_script_step(official, task, PROMPT, input_path, mask_path, FRAMES, HEIGHT, WIDTH, STEPS, SEED)
    assert ours.shape == expected.shape
    error = ((ours - expected).norm() / expected.norm()).item()
    print(f"{task}: relative error {error:.2e}")
    assert error < 1e-5
