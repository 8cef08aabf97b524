"""Packed variable-length micro-batches equal their samples run one by one (single process)."""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.checkpoint.model_state import fill_from_global
from megatron_mfm.export.key_map import from_official
from megatron_mfm.model import MfMDiT, local_layer_spec
from megatron_mfm.model.config import make_config
from megatron_mfm.model.glue import fused_glue
from mfm_cases import make_reference, megatron_config_kwargs
from packing_cases import output_weights, packed_inputs, samples_alone, weighted_sum


def build_model(**overrides) -> MfMDiT:
    config = make_config(**megatron_config_kwargs(), **overrides)
    model = MfMDiT(config, local_layer_spec())
    fill_from_global(model, from_official(make_reference().state_dict(), config))
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / max(b.norm().item(), 1e-12)).item()


@pytest.mark.parametrize("compile_glue", [False, True], ids=["eager-glue", "fused-glue"])
def test_packed_forward_and_gradients_equal_samples_alone(single_process_world, compile_glue):
    """Images and a clip of three shapes in one sequence: per-sample RoPE, timestep/adaLN, text
    and condition; attention within samples only. With the blocks' fused glue regions
    (uncompiled: the math is what is tested) the per-token modulation gradients are not summed."""
    model = build_model()
    if compile_glue:
        for module in model.modules():
            if hasattr(module, "glue"):
                module.glue = fused_glue(False)
    inputs, weights = packed_inputs(), output_weights()
    weighted_sum(samples_alone(model, inputs), weights).backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():
        expected = samples_alone(model, inputs)

    packed = model(**inputs)
    assert [out.shape for out in packed] == [latents.shape for latents in inputs["latents"]]
    for out, exp in zip(packed, expected):
        assert relative_error(out, exp) < 1e-5
    weighted_sum(packed, weights).backward()
    for name, p in model.named_parameters():
        assert relative_error(p.grad, expected_grads[name]) < 1e-5, name


def test_samples_do_not_see_each_other(single_process_world):
    """Changing one sample's latents, text and timestep leaves the other samples' outputs exact."""
    model = build_model()
    inputs = packed_inputs()
    with torch.no_grad():
        before = model(**inputs)
        inputs["latents"][1] = inputs["latents"][1] + 1.0  # the clip
        inputs["text"][2] += 1.0
        inputs["timestep"][2] = 10.0
        after = model(**inputs)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.allclose(before[1], after[1])


def test_modulation_rows_gradient_sums_each_sample():
    """Per-token rows of per-sample values (the padding row zero): gradient of each sample's
    values is the sum over its rows, as autograd's indexing gives it."""
    from megatron_mfm.model.packing import modulation_rows

    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])  # samples 0..2, then two padding rows (3)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    reference = values.detach().clone().requires_grad_()
    weights = torch.randn(len(index), 1, 5, generator=g, dtype=torch.float64)
    rows = modulation_rows(index, values)
    expected = torch.cat([reference, reference.new_zeros(1, 5)])[index][:, None]
    assert torch.equal(rows, expected)
    (rows * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(values.grad, reference.grad)


def test_one_group_pack_runs_as_its_batch(single_process_world):
    """A pack of one shape runs as a plain batch: bit-identical to the unpacked forward of its
    samples, and equal to each sample alone."""
    model = build_model()
    inputs = packed_inputs()
    one_group = dict(inputs, latents=inputs["latents"][:1], condition=inputs["condition"][:1],
                     **{key: inputs[key][:2] for key in ("timestep", "text", "text_mask", "motion_score")})
    with torch.no_grad():
        (packed,) = model(**one_group)
        batch = model(**dict(one_group, latents=one_group["latents"][0], condition=one_group["condition"][0]))
        (alone,) = samples_alone(model, one_group)
    assert torch.equal(packed, batch)
    assert relative_error(packed, alone) < 1e-5
    # and it keeps for backward what the batch keeps: no per-token adaLN rows, no block masks
    # (on the CPU the packed path gives the same bits, so only what it keeps tells them apart)
    assert saved_bytes(model, one_group) == saved_bytes(
        model, dict(one_group, latents=one_group["latents"][0], condition=one_group["condition"][0]))


def saved_bytes(model, inputs: dict) -> int:
    """Bytes of the unique storages autograd keeps for backward in a forward of ``inputs``."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(**inputs)
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}.values())


def test_packs_keep_every_sample_within_the_budget():
    """Two image micro-batches and a clip micro-batch regrouped: every sample once, packs within
    the budget, one part per shape."""
    from megatron_mfm.data.batch import MicroBatch
    from megatron_mfm.training.schedule import batch_tokens
    from megatron_mfm.data.packing import pack_micro_batches

    def batch(ids: list[int], frames: int) -> MicroBatch:
        n = len(ids)
        return MicroBatch(pixels=torch.zeros(n, 3, frames, 32, 32), condition=torch.zeros(n, 5, frames, 32, 32),
                          prompts=["p"] * n, motion_score=torch.zeros(n), tasks=["t2v"] * n,
                          sample_ids=torch.tensor(ids), depth_to_estimate=[[]] * n)

    packs = pack_micro_batches([batch([0, 1], 1), batch([2, 3], 5), batch([4, 5], 1)], token_budget=12)
    assert sorted(torch.cat([p.sample_ids for p in packs]).tolist()) == list(range(6))
    assert [batch_tokens(p) for p in packs] == [12, 12, 8]  # clip + image, clip + image, 2 images
    assert all(len({part.pixels.shape[1:] for part in p.parts}) == len(p.parts) for p in packs)


def test_benchmark_smoke_reports_less_padding_for_packs(single_process_world, tmp_path):
    from benchmarks import packing

    result = packing.main(["--preset", "tiny", "--layers", "1", "--buckets", "1x32x32", "5x32x32", "9x64x64",
                           "--token-budget", "96", "--samples", "8", "--repeats", "1",
                           "--output", str(tmp_path / "packing.json")])
    assert (tmp_path / "packing.json").is_file()
    assert result["packed"]["micro_batches"] <= result["bucketed"]["micro_batches"]
    assert result["packed"]["padding_fraction"] <= result["bucketed"]["padding_fraction"]
