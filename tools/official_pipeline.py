"""Running the official MfM pipeline (github leeruibin/MfM, ``MfMPipeline``) from a local
checkout on a pipeline folder, as its ``infer_mfm_pipeline.py`` builds it: for parity tests and
the sampling benchmark. Nothing of the official code is copied: it is imported from the checkout.

The pipeline module imports decord and torchvision at import time; where they are not installed,
stand-ins serve the few calls it makes (decord: frames of a video read with PyAV; torchvision:
ToTensor, Normalize and rgb_to_grayscale as torchvision documents them) only while the module is
imported.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

from tools.official_repo import official_module


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    return module


def _decord_stand_in() -> types.ModuleType:
    from megatron_mfm.utils.media import read_video

    class Frame:
        def __init__(self, array):
            self.array = array

        def asnumpy(self):
            return self.array

    class VideoReader:
        def __init__(self, path, ctx=None):
            self.frames = read_video(path)

        def __len__(self):
            return len(self.frames)

        def __getitem__(self, index):
            return Frame(self.frames[index])

    return _module("decord", VideoReader=VideoReader, cpu=lambda index=0: None, gpu=lambda index=0: None)


def _torchvision_stand_ins() -> dict[str, types.ModuleType]:
    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, value):
            for step in self.steps:
                value = step(value)
            return value

    class ToTensor:
        def __call__(self, image):
            array = np.array(image)
            array = array[:, :, None] if array.ndim == 2 else array
            return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, tensor):
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
            return tensor.sub(mean).div(torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1))

    def rgb_to_grayscale(image, num_output_channels=1):
        r, g, b = image.unbind(dim=-3)
        grey = (0.2989 * r + 0.587 * g + 0.114 * b).to(image.dtype).unsqueeze(dim=-3)
        return grey.expand(image.shape) if num_output_channels == 3 else grey

    functional = _module("torchvision.transforms.functional", rgb_to_grayscale=rgb_to_grayscale)
    transforms = _module("torchvision.transforms", Compose=Compose, ToTensor=ToTensor, Normalize=Normalize,
                         functional=functional)
    return {"torchvision": _module("torchvision", transforms=transforms), "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional}


def official_pipeline_class(repo: Path):
    """``MfMPipeline`` from the checkout, importing its missing third-party modules as stand-ins."""
    import diffusers  # noqa: F401  (their availability checks run before any stand-in exists)
    import transformers.pipelines  # noqa: F401

    official_module(repo, "mfm.modeling.transformer_3d")
    stand_ins = {}
    if importlib.util.find_spec("decord") is None:
        stand_ins["decord"] = _decord_stand_in()
    if importlib.util.find_spec("torchvision") is None:
        stand_ins.update(_torchvision_stand_ins())
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("mfm.pipelines.pipeline_mfm").MfMPipeline
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def load_official_pipeline(repo: Path | str, folder: Path | str, depth_folder: Path | str,
                           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The official pipeline as infer_mfm_pipeline.py builds it: every component read in float32,
    then the whole pipeline moved to ``device`` and cast to ``dtype`` (the script's default: bf16
    on the GPU), the depth-estimation pipeline on ``device`` in float32 (never cast)."""
    from diffusers import AutoencoderKLCogVideoX, FlowMatchEulerDiscreteScheduler
    from transformers import T5EncoderModel, T5Tokenizer, pipeline

    pipeline_class = official_pipeline_class(repo)
    from mfm.modeling.transformer_3d import Transformer3DModel

    root = Path(folder)
    official = pipeline_class(
        tokenizer=T5Tokenizer.from_pretrained(str(root / "tokenizer")),
        text_encoder=T5EncoderModel.from_pretrained(str(root / "text_encoder")),
        vae=AutoencoderKLCogVideoX.from_pretrained(str(root / "vae")),
        depth_pipe=pipeline(task="depth-estimation", model=str(depth_folder), device=torch.device(device)),
        transformer=Transformer3DModel.from_pretrained(str(root / "transformer"), torch_dtype=torch.float32),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(root / "scheduler")),
    ).to(device, dtype=dtype)
    official.transformer.post_setup_sequence_parallel(None)
    official.set_progress_bar_config(disable=True)
    return official
