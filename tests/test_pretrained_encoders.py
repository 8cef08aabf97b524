"""The real frozen encoders (CogVideoX VAE, T5, Depth-Anything-V2) loaded from local folders of
tiny random models: each matches the library model run directly the way official MfM runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mfm.encoders.interface import MFM_VAE_SCALING_FACTOR, EncoderConfig, build_encoders
from megatron_mfm.tasks.builders import task_prompt
from tiny_pretrained import TEXT_WIDTH, save_tiny_pretrained, tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    return save_tiny_pretrained(tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def encoders(paths):
    return build_encoders(tiny_config(paths), TEXT_WIDTH, CPU)


def smooth_clip(frames: int, height: int, width: int) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1]: gradients that shift over time (no aliasing in resizes)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    shifts = torch.linspace(0, 0.5, frames)[:, None, None]
    return torch.stack([(x + shifts) % 1, y.expand(frames, -1, -1), ((x + y) / 2 + shifts) % 1]) * 2 - 1


def test_text_states_mask_and_official_prompt_form(encoders):
    from transformers import T5EncoderModel

    text = encoders.text
    caption = "A Red Square moving RIGHT, number 0"
    official = f"{caption} #FPS: 24. #task: image-to-video"  # infer_mfm_pipeline.py: prompt + added_prompt + task
    states, mask = encoders.encode_text([task_prompt(caption, "i2v", 24.0), "x"], CPU)
    assert states.shape == (2, 77, TEXT_WIDTH) and mask.shape == (2, 77) and states.dtype == torch.float32

    ids = text.tokenizer([official.lower()], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    assert text.tokenizer([official]).input_ids != text.tokenizer([official.lower()]).input_ids, \
        "the tokenizer is case-sensitive, so lower-casing is observable"
    n = len(text.tokenizer(official.lower()).input_ids)  # with the </s> end token
    assert mask[0].tolist() == [1.0] * n + [0.0] * (77 - n)
    assert mask[1].sum() == len(text.tokenizer("x").input_ids) < n
    model = T5EncoderModel.from_pretrained(text.encoder.name_or_path).eval()
    with torch.no_grad():
        reference = model(input_ids=ids).last_hidden_state  # no attention mask, as the official pipeline
    torch.testing.assert_close(states[:1], reference, rtol=1e-5, atol=1e-5)
    same, _ = encoders.encode_text([f"  {official}  "], CPU)  # upper case and padding spaces as official strips
    torch.testing.assert_close(same, states[:1], rtol=0, atol=0)

    long_states, long_mask = encoders.encode_text([" ".join(["a red square"] * 60)], CPU)
    assert long_mask.sum() == 77 and long_states.shape == (1, 77, TEXT_WIDTH)


def test_vae_latents_are_the_diffusers_posterior_times_the_scale(encoders):
    vae = encoders.video.vae
    video, image = smooth_clip(9, 32, 48)[None], smooth_clip(1, 32, 48)[None]
    latents, image_latents = encoders.encode_video(video), encoders.encode_video(image)
    assert latents.shape == (1, 16, 3, 4, 6) and image_latents.shape == (1, 16, 1, 4, 6)
    with torch.no_grad():
        reference = vae.encode(video).latent_dist.mode() * MFM_VAE_SCALING_FACTOR
        decoded = vae.decode(image_latents / MFM_VAE_SCALING_FACTOR).sample.clamp(-1, 1)
    torch.testing.assert_close(latents, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoders.decode_video(image_latents), decoded, rtol=1e-5, atol=1e-5)


def test_vae_posterior_sampling_and_config_scale(paths, encoders):
    vae = encoders.video.vae
    sampler = build_encoders(tiny_config(paths, sample_posterior=True, vae_scaling_factor=vae.config.scaling_factor),
                             None, CPU).video
    pixels = smooth_clip(1, 32, 32)[None]
    sampled = sampler.encode(pixels, torch.Generator().manual_seed(3))
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        reference = posterior.sample(torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    torch.testing.assert_close(sampled, reference, rtol=1e-5, atol=1e-6)
    assert (sampled - posterior.mode() * vae.config.scaling_factor).abs().max() > 1e-3, "a sample is not the mode"
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        sampler.encode(smooth_clip(4, 32, 32)[None])


def test_depth_of_revealed_frames_matches_the_transformers_pipeline(encoders, paths):
    from transformers import pipeline

    clip = smooth_clip(5, 32, 48)
    depth = encoders.estimate_depth(clip, [0, 4])
    assert depth.shape == (1, 5, 32, 48)
    assert depth[:, 1:4].abs().max() == 0, "frames the task does not reveal get no depth"
    official = pipeline("depth-estimation", model=encoders.depth.model, image_processor=paths["depth_path"])
    for frame in (0, 4):  # the official path: PIL frames through the depth pipeline, raw predicted_depth
        image = ((clip[:, frame] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        reference = official(Image.fromarray(np.ascontiguousarray(image)))["predicted_depth"]
        scale = reference.abs().mean()
        assert scale > 0.01
        # PIL uint8 resizing vs torch float resizing: ~2%; a wrong normalisation or size gives > 30%
        assert (depth[0, frame] - reference).abs().mean() < 0.05 * scale


def test_builtin_kind_shares_the_interface():
    encoders = build_encoders(EncoderConfig(), TEXT_WIDTH, CPU)
    states, mask = encoders.encode_text(["a cat"], CPU)
    assert states.shape == (1, encoders.text.max_length, TEXT_WIDTH) and mask.sum() == 3
    with pytest.raises(ValueError, match="depth_path"):
        encoders.estimate_depth(torch.zeros(3, 5, 16, 16), [0])


def test_bad_paths_and_widths_are_named(paths, tmp_path):
    missing = str(tmp_path / "nowhere" / "vae")
    with pytest.raises(ValueError, match=f"vae_path='{missing}': no such folder"):
        tiny_config({**paths, "vae_path": missing})
    with pytest.raises(ValueError, match="tokenizer_path is required"):
        EncoderConfig(kind="pretrained", vae_path=paths["vae_path"], text_encoder_path=paths["text_encoder_path"])
    with pytest.raises(ValueError, match="dtype='half'"):
        EncoderConfig(dtype="half")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"depth_path='{empty}': cannot load"):
        build_encoders(tiny_config({**paths, "depth_path": str(empty)}), TEXT_WIDTH, CPU)
    with pytest.raises(ValueError, match=f"d_model={TEXT_WIDTH} differs from the model's text_hidden_size=32"):
        build_encoders(tiny_config(paths), 32, CPU)


def test_training_step_gives_the_model_estimated_depth(encoders, single_process_world):
    """Real media carry no depth: the step fills the revealed frames' depth channel from the
    depth model before the DiT sees the condition (and nothing else)."""
    from megatron_mfm.data.batch import collate
    from megatron_mfm.diffusion.flow_matching import FlowMatchingConfig
    from megatron_mfm.model import MfMDiT, local_layer_spec
    from megatron_mfm.model.config import preset_config
    from megatron_mfm.tasks.builders import Clip, build_task_sample
    from megatron_mfm.training.step import make_forward_step

    clip = Clip(pixels=smooth_clip(5, 32, 32), caption="a gradient", fps=16.0, key="real")
    sample = build_task_sample(clip, "i2v", torch.Generator().manual_seed(0))
    assert sample.depth_to_estimate == [0] and sample.condition[3].abs().sum() == 0
    model = MfMDiT(preset_config("tiny", pipeline_dtype=torch.float32), local_layer_spec())
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[4].clone()))
    step = make_forward_step(encoders, FlowMatchingConfig(), seed=0, patch_size=2, dtype=torch.float32, device=CPU)
    step(iter([collate([sample], [0])]), model)
    expected = encoders.estimate_depth(sample.pixels, [0])
    assert expected[0, 0].abs().sum() > 0
    assert torch.equal(seen[0][0, 3:4], expected)
    assert torch.equal(seen[0][0, [0, 1, 2, 4]], sample.condition[[0, 1, 2, 4]])


def test_posterior_draws_follow_the_sample_not_the_batch(paths):
    """The training step seeds the VAE posterior per sample id: the same clip gets the same
    latents alone or next to another clip (so PP stages and layouts agree), a new id differs."""
    from megatron_mfm.data.rng import sample_generator

    sampling = build_encoders(tiny_config(paths, sample_posterior=True), TEXT_WIDTH, CPU)
    a, b = smooth_clip(5, 32, 32), smooth_clip(5, 32, 32).flip(-1)
    pair = sampling.encode_video(torch.stack([a, b]), [sample_generator(0, i, 4) for i in (7, 8)])
    alone = sampling.encode_video(a[None], [sample_generator(0, 7, 4)])
    other = sampling.encode_video(a[None], [sample_generator(0, 9, 4)])
    assert torch.allclose(pair[:1], alone, atol=1e-5)  # batched convolutions round differently
    assert (alone - other).abs().max() > 1e-2
