"""On a GPU the AOTInductor package of the transformer, compiled for CUDA in bf16, equals the
eager bf16 model at shapes other than the traced one."""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.export import serving
from megatron_mfm.model.config import preset_config
from megatron_mfm.model.dit import build_model
from megatron_mfm.model.specs import local_layer_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# (batch, latent frames, latent height, latent width, text tokens): images, a video (CUDA graphs
# take batches of 2 or more: serving.min_batch_on).
SHAPES = [(2, 1, 8, 12, 7), (3, 5, 12, 8, 77)]


def test_cuda_bf16_package_equals_eager(single_process_world, tmp_path):
    torch.manual_seed(0)
    model = build_model(preset_config("tiny"), local_layer_spec()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.05)
    path = serving.save_aoti_package(model, tmp_path / "transformer.pt2", torch.bfloat16, "cuda")
    runner = torch._inductor.aoti_load_package(str(path))
    for shape in SHAPES:
        inputs = serving.example_inputs(model.config, *shape, dtype=torch.bfloat16, device="cuda")
        latents, timestep, text, text_mask, condition, motion_score = inputs
        with torch.no_grad():
            expected = model(latents, timestep, text, text_mask, condition=condition, motion_score=motion_score).float()
        error = (runner(*inputs).float() - expected).norm() / expected.norm()
        assert error.item() < 2e-2, (shape, error.item())
