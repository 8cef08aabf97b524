"""TP=2, TP=2 with sequence parallelism and CP=2 (all-to-all and ring; 2 gloo processes) equal the
single-process model."""

from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from megatron_mfm.export.key_map import from_official
from megatron_mfm.checkpoint.model_state import fill_from_global
from megatron_mfm.model import MfMDiT, local_layer_spec
from megatron_mfm.model.config import make_config
from mfm_cases import make_inputs, make_reference, megatron_config_kwargs


def forward_backward(model: MfMDiT, inputs: dict, weight: torch.Tensor) -> torch.Tensor:
    out = model(**inputs)
    (out * weight).sum().backward()
    return out.detach()


def _tp_worker(sequence_parallel: bool, compile_glue: bool, state: dict, inputs: dict, weight: torch.Tensor) -> dict:
    """The compiled-glue case also recomputes the MLP activation and the norm outputs (``mlp_act``,
    ``layernorm``)."""
    from megatron.core import parallel_state

    from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(tensor_parallel_size=2)
    config = make_config(**megatron_config_kwargs(), tensor_model_parallel_size=2,
                         sequence_parallel=sequence_parallel, compile_glue=compile_glue,
                         recompute_mlp_activation=compile_glue, recompute_norm_outputs=compile_glue)
    model = MfMDiT(config, local_layer_spec())
    fill_from_global(model, state)
    out = forward_backward(model, inputs, weight)
    params = dict(model.named_parameters())
    grads = {}
    for name, sh in model.sharded_state_dict().items():
        if name not in params:  # _extra_state objects
            continue
        grad = params[name].grad
        if getattr(params[name], "sequence_parallel", False):
            # What megatron's finalize_model_grads does for SP-replicated parameters.
            torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        grads[name] = (sh.global_slice(), grad.clone())
    destroy_parallel()
    return {"out": out, "grads": grads}


@pytest.mark.parametrize("sequence_parallel,compile_glue", [(False, False), (True, False), (True, True)],
                         ids=["tp2", "tp2-sp", "tp2-sp-compiled-glue-output-recompute"])
def test_tensor_parallel_matches_single_process(single_process_world, sequence_parallel, compile_glue):
    """The eager single-process model against TP ranks (with SP, with the fused glue: its QK-norm
    all-reduces between fused regions, its modulation gradients sum over TP ranks; with the MLP
    activation and the norm outputs recomputed in backward)."""
    config = make_config(**megatron_config_kwargs())
    state = from_official(make_reference().state_dict(), config)
    inputs = make_inputs(frames=3)  # 3 x 2 x 3 = 18 tokens: split evenly under SP
    model = MfMDiT(config, local_layer_spec())
    fill_from_global(model, state)
    weight = torch.randn(inputs["latents"].shape)
    expected_out = forward_backward(model, inputs, weight)
    expected_grads = {name: p.grad for name, p in model.named_parameters()}

    for result in run_on_ranks(2, _tp_worker, sequence_parallel, compile_glue, state, inputs, weight):
        err = (result["out"] - expected_out).norm() / expected_out.norm()
        assert err < 1e-5
        for name, (global_slice, grad) in result["grads"].items():
            expected = expected_grads[name][global_slice]
            scale = max(expected.norm().item(), 1e-12)
            assert (grad - expected).norm().item() / scale < 1e-5, name


def _cp_worker(comm: str, state: dict, inputs: dict, weight_tokens: torch.Tensor) -> dict:
    from megatron.core import parallel_state

    from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(context_parallel_size=2)
    config = make_config(**megatron_config_kwargs(), context_parallel_size=2, cp_comm_type=comm)
    model = MfMDiT(config, local_layer_spec())
    fill_from_global(model, state)
    out = model(**inputs)  # the whole velocity on every CP rank
    (model.patchify(out) * weight_tokens).sum().backward()  # every rank the same loss
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_context_parallel_group())  # DDP's job
        grads[name] = grad
    result = {"out": out.detach(), "padded": model.token_layout((3, 3, 3)).padded, "grads": grads}
    destroy_parallel()
    return result


@pytest.mark.parametrize("comm", ["a2a", "p2p"], ids=["cp2-a2a", "cp2-ring"])
def test_context_parallel_with_padding_matches_single_process(single_process_world, comm):
    """CP=2 (all-to-all or ring attention) on an odd token count: 3 latent frames of 3 x 3
    patches = 27 tokens, padded to 28 and masked; outputs and gradients equal CP=1."""
    config = make_config(**megatron_config_kwargs())
    state = from_official(make_reference().state_dict(), config)
    inputs = make_inputs(frames=3)
    g = torch.Generator().manual_seed(5)
    inputs["latents"] = torch.randn(2, 16, 3, 6, 6, generator=g)  # 3 x 3 patches a frame
    inputs["condition"] = torch.randn(2, 5, 9, 48, 48, generator=g)
    model = MfMDiT(config, local_layer_spec())
    fill_from_global(model, state)
    out = model(**inputs)
    expected_tokens = model.patchify(out)  # (27, B, p*p*C)
    weight_tokens = torch.randn(expected_tokens.shape)
    (expected_tokens * weight_tokens).sum().backward()
    expected_grads = {name: p.grad for name, p in model.named_parameters()}

    for result in run_on_ranks(2, _cp_worker, comm, state, inputs, weight_tokens):
        assert result["padded"] == 28
        assert ((result["out"] - out.detach()).norm() / out.norm()).item() < 1e-5
        for name, grad in result["grads"].items():
            exp = expected_grads[name]
            assert (grad - exp).norm().item() / max(exp.norm().item(), 1e-12) < 1e-5, name
