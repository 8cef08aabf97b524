"""``model.recompute_modules: [layernorm, mlp_act]``: the three pre-norm outputs and the MLP's GELU
output are freed once the linear reading them has run and recomputed in backward; the same
numbers, those activations no longer kept."""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.checkpoint.model_state import fill_from_global
from megatron_mfm.config import ConfigError, load_config
from megatron_mfm.export.key_map import from_official
from megatron_mfm.model import MfMDiT, local_layer_spec
from megatron_mfm.model.config import make_config
from mfm_cases import make_inputs, make_reference, megatron_config_kwargs


def run_model(compile_glue: bool = False, **recompute) -> dict:
    """Output, parameter gradients and the bytes of unique storages still held by autograd's saved
    tensors at the end of the forward (a storage freed after being saved counts zero; parameters,
    alive anyway, count zero)."""
    config = make_config(**megatron_config_kwargs(), compile_glue=compile_glue, **recompute)
    model = MfMDiT(config, local_layer_spec())
    fill_from_global(model, from_official(make_reference().state_dict(), config))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(**make_inputs(3))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    storages = {pointer: size for pointer, size in storages.items() if pointer not in parameters}
    out.square().sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"out": out.detach(), "grads": grads, "saved_bytes": sum(storages.values()), "config": config}


OPTIONS = {"mlp_act": dict(recompute_mlp_activation=True), "layernorm": dict(recompute_norm_outputs=True),
           "both": dict(recompute_mlp_activation=True, recompute_norm_outputs=True)}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("compile_glue", [False, True], ids=["eager-glue", "compiled-glue"])
def test_same_output_and_gradients(single_process_world, compile_glue, option):
    """Recomputing GELU or a norm from the same input gives the same bits: outputs and every
    gradient are equal, not just close. One exception: with the eager glue, the residual stream's
    gradient sums the recomputed norm's part in another order (fp32 rounding, ~1e-7)."""
    kept, recomputed = run_model(compile_glue), run_model(compile_glue, **OPTIONS[option])
    assert torch.equal(recomputed["out"], kept["out"])
    summed_in_another_order = option != "mlp_act" and not compile_glue
    for name, grad in kept["grads"].items():
        if summed_in_another_order:
            torch.testing.assert_close(recomputed["grads"][name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())
        else:
            assert torch.equal(recomputed["grads"][name], grad), name


def test_same_gradients_under_block_selective_mlp(single_process_world):
    """``layernorm`` inside the block-selective ``mlp`` recompute (its recompute pass frees and
    refills the MLP's norm output again): the same gradients."""
    selective = dict(recompute_granularity="selective", recompute_modules=["mlp"])
    kept, recomputed = run_model(True, **selective), run_model(True, **selective, recompute_norm_outputs=True)
    for name, grad in kept["grads"].items():
        assert torch.equal(recomputed["grads"][name], grad), name


TOKENS, BATCH = 3 * 2 * 3, 2  # make_inputs(3): frames x (4 / 2) x (6 / 2) patches, batch 2; fp32


def test_activation_is_no_longer_kept(single_process_world):
    """Backward keeps exactly one (tokens x batch x 4D) activation less per block: the GELU output
    fc2 saved is freed (fc1's output stays, GELU's backward needs it)."""
    kept, recomputed = run_model(), run_model(recompute_mlp_activation=True)
    activation_bytes = TOKENS * BATCH * kept["config"].ffn_hidden_size * 4
    assert kept["saved_bytes"] - recomputed["saved_bytes"] == kept["config"].num_layers * activation_bytes


def test_norm_outputs_are_no_longer_kept(single_process_world):
    """With the fused glue (which keeps no fp32 intermediates), ``layernorm`` keeps exactly three
    (tokens x batch x D) activations less per block: the inputs of the qkv, cross-attention query
    and fc1 linears; the residual stream the norms read stays kept."""
    kept, recomputed = run_model(True), run_model(True, recompute_norm_outputs=True)
    norm_output_bytes = TOKENS * BATCH * kept["config"].hidden_size * 4
    assert kept["saved_bytes"] - recomputed["saved_bytes"] == kept["config"].num_layers * 3 * norm_output_bytes


def test_config_names_and_combinations():
    """layernorm and mlp_act map to their own fields and combine with full and auto recompute;
    the block-selective mlp does not, and unknown names are refused naming the field."""
    config = load_config(overrides=["model.recompute_modules=[layernorm, mlp, mlp_act]"]).to_model_config()
    assert config.recompute_norm_outputs and config.recompute_mlp_activation
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["mlp"]
    full = load_config(overrides=["model.recompute=true", "model.recompute_modules=[layernorm, mlp_act]"])
    full = full.to_model_config()
    assert full.recompute_norm_outputs and full.recompute_mlp_activation and full.recompute_granularity == "full"
    alone = load_config(overrides=["model.recompute_modules=[layernorm]"]).to_model_config()
    assert alone.recompute_norm_outputs and not alone.recompute_mlp_activation
    assert alone.recompute_granularity is None
    with pytest.raises(ConfigError, match=r"model.recompute_modules: \['mlp'\] need model.recompute=false"):
        load_config(overrides=["model.recompute=true", "model.recompute_modules=[mlp, mlp_act]"])
    with pytest.raises(ConfigError, match="model.recompute_modules: unknown \\['gelu'\\]"):
        load_config(overrides=["model.recompute_modules=[gelu]"])
