"""The megatron MfM DiT equals an independent plain-PyTorch reference (fp32, TP=1)."""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.export.key_map import from_official, to_official
from megatron_mfm.checkpoint.model_state import fill_from_global
from megatron_mfm.model import MfMDiT, local_layer_spec
from megatron_mfm.model.config import make_config
from megatron_mfm.model.rope import rope_cos_sin
from mfm_cases import make_inputs, make_reference, megatron_config_kwargs


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def build_pair(single_process_world):
    reference = make_reference()
    config = make_config(**megatron_config_kwargs())
    model = MfMDiT(config, local_layer_spec())
    fill_from_global(model, from_official(reference.state_dict(), config))
    return reference, model, config


@pytest.mark.parametrize(
    "frames,with_condition",
    [(1, True), (1, False), (3, True), (3, False)],
    ids=["image-cond", "image-t2i", "video-cond", "video-t2v"],
)
def test_forward_and_gradients_match_reference(single_process_world, frames, with_condition):
    reference, model, config = build_pair(single_process_world)
    inputs = make_inputs(frames, with_condition)

    expected = reference(**inputs)
    actual = model(**inputs)
    assert actual.shape == expected.shape == inputs["latents"].shape
    assert relative_error(actual, expected) < 1e-5

    weight = torch.randn_like(expected)
    (expected * weight).sum().backward()
    (actual * weight).sum().backward()
    ours = {name: p.grad for name, p in model.named_parameters()}
    ours_official = to_official(ours, config)
    for name, p in reference.named_parameters():
        assert p.grad is not None, name
        if p.grad.norm() == 0:
            assert ours_official[name].norm() == 0, name
            continue
        assert relative_error(ours_official[name], p.grad) < 1e-5, name


def test_t2v_condition_none_means_zeros(single_process_world):
    _, model, _ = build_pair(single_process_world)
    inputs = make_inputs(3, with_condition=False)
    with torch.no_grad():
        zeros = model(**inputs)
        inputs["condition"] = None
        none = model(**inputs)
    assert torch.equal(zeros, none)


def test_text_padding_is_masked(single_process_world):
    """Changing padded text tokens must not change the output; changing real ones must."""
    _, model, _ = build_pair(single_process_world)
    inputs = make_inputs(1)
    with torch.no_grad():
        base = model(**inputs)
        inputs["text"][0, 5] += 1.0  # padded position of sample 0
        assert torch.equal(model(**inputs)[0], base[0])
        inputs["text"][0, 1] += 1.0  # real token
        assert not torch.allclose(model(**inputs)[0], base[0])


def test_bad_condition_shape_names_shapes(single_process_world):
    _, model, _ = build_pair(single_process_world)
    inputs = make_inputs(3)
    inputs["condition"] = inputs["condition"][:, :, :5]
    with pytest.raises(ValueError, match="4\\*\\(T-1\\)\\+1 frames"):
        model(**inputs)


def test_official_init(single_process_world):
    """adaLN and output projections start at zero, so the initial prediction is exactly zero."""
    config = make_config(**megatron_config_kwargs())
    model = MfMDiT(config, local_layer_spec())
    for layer in model.layers:
        assert layer.adaln.weight.abs().sum() == 0
    with torch.no_grad():
        assert model(**make_inputs(1)).abs().sum() == 0
    qkv = model.layers[0].self_attention.linear_qkv.weight
    bound = (6.0 / (2 * config.hidden_size)) ** 0.5
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound


def test_parity_cases_exercise_every_block_part(single_process_world):
    """Guard against a blunt yardstick: with the test weights, perturbing any attention or MLP
    projection moves the output by far more than the 1e-5 parity tolerance."""
    reference = make_reference()
    inputs = make_inputs(3)
    with torch.no_grad():
        base = reference(**inputs)
        block = reference.transformer_blocks[0]
        for linear in (block.attn1.q_proj, block.attn1.k_proj, block.attn2.k_proj, block.attn2.v_proj, block.ff.fc1):
            saved = linear.weight.clone()
            linear.weight.add_(0.01 * torch.randn_like(saved))
            assert relative_error(reference(**inputs), base) > 1e-3
            linear.weight.copy_(saved)


RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["mlp"], recompute_norm_outputs=True),
    "first block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
}


def test_recompute_gives_the_same_gradients_and_saves_less(single_process_world):
    """Full, partial (first block only) and selective recompute change what backward keeps
    (counted through the saved-tensor hooks), never the gradients."""
    reference = make_reference()
    inputs = make_inputs(3)
    grads, saved_bytes = {}, {}
    for mode, extra in RECOMPUTE.items():
        model = MfMDiT(make_config(**megatron_config_kwargs(), **extra), local_layer_spec())
        fill_from_global(model, from_official(reference.state_dict(), model.config))
        sizes = []

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(**inputs).square().sum()
        loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
        saved_bytes[mode] = sum(sizes)
    for mode in ("full", "selective", "first block"):
        for name, grad in grads["none"].items():
            error = (grads[mode][name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)
            assert error < 1e-5, (mode, name, error.item())  # summation order differs, nothing else
    assert saved_bytes["full"] < saved_bytes["selective"] < saved_bytes["none"], saved_bytes
    assert saved_bytes["full"] < saved_bytes["first block"] < saved_bytes["none"], saved_bytes


def test_text_keys_fit_the_prompts_and_fp8_rows():
    """Trailing text tokens masked in every sample are dropped (no mask left for one prompt), and
    FP8 pads the rows to a multiple of 16 with masked keys, saying how many are real when only
    the added rows are masked (two different prompts keep their mask)."""
    from megatron_mfm.model.dit import fit_text

    text = torch.randn(2, 77, 8)
    padded, mask, real = fit_text(text, None, row_multiple=16)
    assert padded.shape == (80, 2, 8) and torch.equal(padded[:77], text.transpose(0, 1))
    assert mask[:, :77].all() and not mask[:, 77:].any() and real == 77
    keys, mask, real = fit_text(text, None)
    assert torch.equal(keys, text.transpose(0, 1)) and mask is None and real is None
    prompts = torch.arange(77)[None] < torch.tensor([[12], [30]])  # two prompts, end-padded
    keys, mask, real = fit_text(text, prompts)
    assert keys.shape == (30, 2, 8) and torch.equal(mask, prompts[:, :30]) and real is None
    keys, mask, real = fit_text(text, prompts, row_multiple=16)
    assert keys.shape == (32, 2, 8) and torch.equal(mask[:, :30], prompts[:, :30]) and real is None
    keys, mask, real = fit_text(text[:1], prompts[:1])
    assert keys.shape == (12, 1, 8) and mask is None and real is None


def text_reaching_model() -> MfMDiT:
    """The tiny fp32 model with its zero-initialised parameters (adaLN, the head, biases) drawn
    at random: as initialised, the text does not reach the output, and a test of the text's
    handling could not fail."""
    model = tiny_model(False, torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(std=0.05)
    return model


def test_dropping_masked_text_keys_keeps_the_output(single_process_world):
    """The model's output with an end-padded prompt equals the output with the prompt alone."""
    model = text_reaching_model()
    inputs = make_inputs(1, batch=1)
    used = 4
    inputs["text_mask"] = torch.arange(inputs["text"].shape[1])[None] < used
    whole = model(**inputs)
    trimmed = model(**{**inputs, "text": inputs["text"][:, :used], "text_mask": None})
    assert relative_error(whole, trimmed) < 1e-6
    assert relative_error(model(**{**inputs, "text": inputs["text"].flip(-1)}), whole) > 1e-3  # the text counts


def test_fp8_text_rows_cut_or_masked_keep_the_output(single_process_world):
    """FP8's added text rows, cut off after the key projection (the real row count known) or
    masked, give the output and gradients of the unpadded prompt."""
    from megatron_mfm.model.dit import fit_text

    model = text_reaching_model()
    inputs = make_inputs(1, batch=2)
    keys, mask, real = fit_text(inputs["text"], None, row_multiple=16)
    assert real == inputs["text"].shape[1] and keys.shape[0] % 16 == 0
    results = []
    for fitted in (fit_text(inputs["text"], None), (keys, mask, real), (keys, mask, None)):
        model.zero_grad()
        out = model.forward_clip(inputs["latents"], inputs["timestep"], *fitted, inputs["condition"],
                                 inputs.get("motion_score"))
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (expected, expected_grads), *others = results
    for out, grads in others:
        assert relative_error(out, expected) < 1e-6
        for grad, expected_grad in zip(grads, expected_grads):
            assert relative_error(grad, expected_grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_glue_matches_eager(single_process_world, dtype):
    """``compile_glue`` fuses the norms, modulation, QK-norm + RoPE and gated residuals: the same
    outputs and gradients as the eager blocks (bf16: one rounding per fused region instead of
    one per op)."""
    reference = make_reference()
    inputs = {k: v.to(dtype) if v.is_floating_point() and v.dim() > 1 else v for k, v in make_inputs(3).items()}
    outputs, grads = {}, {}
    for compiled in (False, True):
        model = tiny_model(compiled, dtype)
        fill_from_global(model, from_official(reference.state_dict(), model.config))
        outputs[compiled] = model(**inputs)
        outputs[compiled].float().square().sum().backward()
        grads[compiled] = {n: p.grad.float() for n, p in model.named_parameters()}
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(outputs[True].float(), outputs[False].float()) < tolerance
    for name, grad in grads[False].items():
        if grad.norm() > 0:
            assert relative_error(grads[True][name], grad) < tolerance, name


def test_compiled_glue_keeps_less_for_backward(single_process_world):
    """In bf16 a compiled block keeps its 16-bit inputs for backward, not the fp32 intermediates
    of the norms, modulation, RoPE and gates (counted through the saved-tensor hooks)."""
    saved = {}
    for compiled in (False, True):
        layer = tiny_model(compiled, torch.bfloat16).layers[0]
        tokens, batch, grid = 96, 2, (4, 4, 6)
        x = torch.randn(tokens, batch, layer.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        c = torch.randn(batch, layer.config.hidden_size, dtype=torch.bfloat16)
        text = torch.randn(7, batch, layer.config.text_hidden_size, dtype=torch.bfloat16)
        kept = {}

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            kept[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            layer(x, c, text, None, rope_cos_sin(grid, layer.config.kv_channels)).float().sum().backward()
        saved[compiled] = sum(kept.values())  # a tensor kept by several ops counts once
    assert saved[True] < 0.7 * saved[False], saved


def tiny_model(compile_glue: bool, dtype: torch.dtype) -> MfMDiT:
    config = make_config(**megatron_config_kwargs(), compile_glue=compile_glue, params_dtype=dtype,
                         bf16=dtype == torch.bfloat16)
    return MfMDiT(config, local_layer_spec()).to(dtype)
