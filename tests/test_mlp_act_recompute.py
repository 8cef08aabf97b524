"""``model.recompute_modules: [mlp_act]``: the MLP's GELU output is freed after fc2's forward and
recomputed in backward; the same numbers, one activation less kept per block."""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.checkpoint.model_state import fill_from_global
from megatron_mfm.config import ConfigError, load_config
from megatron_mfm.export.key_map import from_official
from megatron_mfm.model import MfMDiT, local_layer_spec
from megatron_mfm.model.config import make_config
from mfm_cases import make_inputs, make_reference, megatron_config_kwargs


def run_model(recompute_mlp_activation: bool, compile_glue: bool = False, **extra) -> dict:
    """Output, parameter gradients and the bytes of unique storages still held by autograd's saved
    tensors at the end of the forward (a storage freed after being saved counts zero)."""
    config = make_config(**megatron_config_kwargs(), recompute_mlp_activation=recompute_mlp_activation,
                         compile_glue=compile_glue, **extra)
    model = MfMDiT(config, local_layer_spec())
    fill_from_global(model, from_official(make_reference().state_dict(), config))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(**make_inputs(3))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    out.square().sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"out": out.detach(), "grads": grads, "saved_bytes": sum(storages.values()), "config": config}


@pytest.mark.parametrize("compile_glue", [False, True], ids=["eager-glue", "compiled-glue"])
def test_same_output_and_gradients(single_process_world, compile_glue):
    """Recomputing GELU from the same input gives the same bits: outputs and every gradient are
    equal, not just close."""
    kept, recomputed = run_model(False, compile_glue), run_model(True, compile_glue)
    assert torch.equal(recomputed["out"], kept["out"])
    for name, grad in kept["grads"].items():
        assert torch.equal(recomputed["grads"][name], grad), name


def test_activation_is_no_longer_kept(single_process_world):
    """Backward keeps exactly one (tokens x batch x 4D) activation less per block: the GELU output
    fc2 saved is freed (fc1's output stays, GELU's backward needs it)."""
    kept, recomputed = run_model(False), run_model(True)
    config = kept["config"]
    tokens = 3 * 2 * 3  # frames x (4 / 2) x (6 / 2) patches
    activation_bytes = tokens * 2 * config.ffn_hidden_size * 4  # batch 2, fp32
    assert kept["saved_bytes"] - recomputed["saved_bytes"] == config.num_layers * activation_bytes


def test_config_names_and_combinations():
    """mlp_act maps to its own field, combines with full and auto recompute; block-selective
    modules do not, and unknown names are refused naming the field."""
    config = load_config(overrides=["model.recompute_modules=[layernorm, mlp_act]"]).to_model_config()
    assert config.recompute_mlp_activation and config.recompute_granularity == "selective"
    assert config.recompute_modules == ["layernorm"]
    full = load_config(overrides=["model.recompute=true", "model.recompute_modules=[mlp_act]"]).to_model_config()
    assert full.recompute_mlp_activation and full.recompute_granularity == "full"
    alone = load_config(overrides=["model.recompute_modules=[mlp_act]"]).to_model_config()
    assert alone.recompute_mlp_activation and alone.recompute_granularity is None
    with pytest.raises(ConfigError, match=r"model.recompute_modules: \['mlp'\] need model.recompute=false"):
        load_config(overrides=["model.recompute=true", "model.recompute_modules=[mlp, mlp_act]"])
    with pytest.raises(ConfigError, match="model.recompute_modules: unknown \\['gelu'\\]"):
        load_config(overrides=["model.recompute_modules=[gelu]"])
