"""Loading a model checkpoint (``checkpoint/model_state.load_model``) into a model whose modules
differ only in their extra state (FP8 metadata): a run trained with FlashAttention-4 core
attention (no extra state) is evaluated with Transformer Engine's (extra state), and back."""

from __future__ import annotations

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_mfm.checkpoint.model_state import load_model
from mfm_cases import make_inputs
from test_model_parity import tiny_model


def test_checkpoint_without_an_extra_state_loads(single_process_world, tmp_path):
    """The module that expects the missing extra state behaves as Transformer Engine's do in a
    strict load: no default for it (megatron's local linears add an empty one by a pre-hook)."""
    saved = tiny_model(False, torch.float32)
    state = saved.sharded_state_dict()
    dropped = "layers.0.self_attention.linear_qkv._extra_state"
    assert isinstance(state.pop(dropped), ShardedObject)  # as a module without extra state writes it
    dist_checkpointing.save(state, str(tmp_path))
    torch.manual_seed(7)
    loaded = tiny_model(False, torch.float32)
    loaded.layers[0].self_attention.linear_qkv._load_state_dict_pre_hooks.clear()
    with torch.no_grad():
        for parameter in loaded.parameters():
            parameter.normal_()
    load_model(loaded, tmp_path)
    for (name, expected), actual in zip(saved.named_parameters(), loaded.parameters()):
        assert torch.equal(actual, expected), name  # the output alone would not say: the head starts at zero
    inputs = make_inputs(1)
    assert torch.equal(loaded(**inputs), saved(**inputs))
