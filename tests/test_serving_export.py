"""Serving exports of the transformer (torch.export / AOTInductor, ONNX, safetensors) equal the
eager model at shapes other than the traced one, and unsupported models are refused by name."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from megatron_mfm.checkpoint.model_state import build_from_official, global_state, save_model
from megatron_mfm.export import serving
from megatron_mfm.export.official_io import CONFIG_NAME, write_official
from megatron_mfm.model.config import preset_config
from megatron_mfm.model.dit import MfMDiT, build_model
from megatron_mfm.model.specs import local_layer_spec
from tools import export_serving

# (batch, latent frames, latent height, latent width, text tokens) other than the traced example:
# one image without guidance, and a larger video.
SHAPES = [(1, 1, 4, 6, 3), (3, 3, 6, 4, 16)]

slow = pytest.mark.skipif(not os.environ.get("MFM_SLOW_TESTS"),
                          reason="AOTInductor compiles C++ for minutes on a CPU; set MFM_SLOW_TESTS=1")


@pytest.fixture(scope="module")
def model(single_process_world) -> MfMDiT:
    """The tiny model with every weight random (the head starts at zero)."""
    torch.manual_seed(0)
    model = build_model(preset_config("tiny"), local_layer_spec()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.05)
    return model


def eager(model: MfMDiT, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    latents, timestep, text, text_mask, condition, motion_score = inputs
    with torch.no_grad():
        return model(latents, timestep, text, text_mask, condition=condition, motion_score=motion_score)


def inputs_of(model: MfMDiT, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    batch, frames, height, width, text = shape
    return serving.example_inputs(model.config, batch, frames, height, width, text)


@pytest.fixture(scope="module")
def reloaded_program(model, tmp_path_factory) -> torch.nn.Module:
    """The graph AOTInductor compiles, saved and loaded back."""
    path = tmp_path_factory.mktemp("program") / "transformer.pt2"
    torch.export.save(serving.export_program(model), str(path))
    return torch.export.load(str(path)).module()


@pytest.mark.parametrize("shape", SHAPES, ids=["image", "video"])
def test_saved_exported_program_equals_eager_at_other_shapes(model, reloaded_program, shape):
    """Frames, size, batch and text length are free (the example was batch 2, 2 frames, 4x6
    latents, 5 tokens)."""
    inputs = inputs_of(model, shape)
    torch.testing.assert_close(reloaded_program(*inputs), eager(model, inputs), rtol=0, atol=1e-5)


@slow
def test_aoti_package_equals_eager(model, tmp_path):
    path = serving.save_aoti_package(model, tmp_path / "transformer.pt2")
    runner = torch._inductor.aoti_load_package(str(path))
    for shape in SHAPES:
        inputs = inputs_of(model, shape)
        torch.testing.assert_close(runner(*inputs), eager(model, inputs), rtol=0, atol=1e-5)


def test_onnx_runtime_equals_eager_with_dynamic_axes(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = serving.save_onnx(model, tmp_path / "transformer.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = serving.input_names(model.config)
    assert [i.name for i in session.get_inputs()] == list(names)
    latents_axes = session.get_inputs()[0].shape
    assert all(isinstance(axis, str) for axis in latents_axes[:1] + latents_axes[2:]), latents_axes
    for shape in SHAPES:
        inputs = inputs_of(model, shape)
        (velocity,) = session.run([serving.OUTPUT_NAME], {n: t.numpy() for n, t in zip(names, inputs)})
        torch.testing.assert_close(torch.from_numpy(velocity), eager(model, inputs), rtol=0, atol=1e-4)


def test_unsupported_models_are_refused_by_name(single_process_world):
    config = preset_config("tiny", compile_glue=True)
    first_stage = MfMDiT(config, local_layer_spec(), pre_process=True, post_process=False)
    with pytest.raises(ValueError, match=r"pipeline stages, compiled glue"):
        serving.ServingTransformer(first_stage)
    with pytest.raises(ValueError, match="pipeline stages"):
        serving.save_weights(first_stage, "unused", torch.bfloat16)


def test_official_io_files_honour_the_umask(tmp_path):
    """safetensors alone writes 0600: a serving user could not read the weights."""
    previous = os.umask(0o027)
    try:
        folder = write_official(tmp_path / "transformer", {"a": 1}, {"w": torch.ones(2)})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o640}, modes


@pytest.fixture(scope="module")
def official_folder(model, tmp_path_factory) -> Path:
    return serving.save_weights(model, tmp_path_factory.mktemp("official") / "transformer", torch.float16)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_tool_writes_half_precision_weights_of_a_checkpoint(model, tmp_path, dtype):
    checkpoint = save_model(model, tmp_path / "checkpoint")
    output = tmp_path / "serving"
    export_serving.main(["safetensors", "--checkpoint", str(checkpoint), "--output", str(output), "--dtype", dtype])
    half = serving.SERVING_DTYPES[dtype]
    reloaded = global_state(build_from_official(output))
    expected = {key: tensor.to(half).float() for key, tensor in global_state(model).items()}
    assert reloaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(reloaded[key], expected[key]), key
    assert (output / CONFIG_NAME).is_file()


@pytest.mark.parametrize("arguments, output_name, message", [
    (["onnx", "--dtype", "bf16"], "model.onnx", "onnx export supports fp32, fp16"),
    (["onnx", "--opset", "17"], "model.onnx", "opset >= 18"),
    (["safetensors", "--device", "cuda"], "weights", "only the pt2 export is compiled for a device"),
    (["pt2"], "model.onnx", "must end in .pt2"),
])
def test_tool_refuses_with_one_line(official_folder, tmp_path, arguments, output_name, message):
    output = tmp_path / output_name
    with pytest.raises(SystemExit) as exit_info:
        export_serving.main([*arguments, "--official", str(official_folder), "--output", str(output)])
    text = str(exit_info.value.code)
    assert message in text and "\n" not in text and not output.exists()


def test_tool_refuses_ema_of_an_official_folder(official_folder, capsys):
    with pytest.raises(SystemExit):
        export_serving.main(["pt2", "--official", str(official_folder), "--output", "x.pt2", "--weights", "ema"])
    assert "--weights ema needs --checkpoint" in capsys.readouterr().err
