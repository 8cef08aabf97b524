"""A packed sequence under TP2 with SP, CP2 (all-to-all and ring) and PP2 equals one process:
outputs and gradients, on 2 gloo processes that run the four layouts one after another."""

from __future__ import annotations

import re

import torch

from distributed import run_on_ranks
from megatron_mfm.checkpoint.model_state import fill_from_global
from megatron_mfm.export.key_map import from_official
from megatron_mfm.model import MfMDiT, local_layer_spec
from megatron_mfm.model.config import make_config
from mfm_cases import make_reference, megatron_config_kwargs
from packing_cases import output_weights, packed_inputs, weighted_sum

LAYOUTS = {
    "tp2-sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "cp2-a2a": dict(context_parallel_size=2, cp_comm_type="a2a"),
    "cp2-ring": dict(context_parallel_size=2, cp_comm_type="p2p"),
    "pp2": dict(pipeline_model_parallel_size=2, variable_seq_lengths=True, moe_token_dispatcher_type="alltoall"),
}


def _global_grads(model: MfMDiT) -> dict:
    """Every local gradient with its global name and slice, reduced as megatron's finalize and
    DDP would: summed over TP for SP-replicated parameters, averaged over CP for all."""
    from megatron.core import parallel_state

    sharded = model.sharded_state_dict()
    grads = {}
    for name, param in model.named_parameters():
        match = re.match(r"layers\.(\d+)\.", name)
        if match:
            name = f"layers.{model.layers[int(match[1])].layer_number - 1}.{name[match.end():]}"
        grad = param.grad.clone()
        if getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        # megatron's schedule scales the loss by CP; DDP averages over DP x CP
        torch.distributed.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        grads[name] = (sharded[name].global_slice(), grad / parallel_state.get_context_parallel_world_size())
    return grads


def _run_layout(overrides: dict, state: dict, inputs: dict, weights: list[torch.Tensor]) -> dict:
    """One forward and backward of the packed inputs through megatron's schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mfm.model.dit import build_model

    config = make_config(**megatron_config_kwargs(), **overrides)
    model = build_model(config, local_layer_spec())
    fill_from_global(model, state)
    outputs = []

    def forward_step(data_iterator, module):
        def loss(output):
            outputs.append([out.detach() for out in output])
            return weighted_sum(output, weights), {}
        return module(**next(data_iterator)), loss

    seq = model.pipeline_seq_length(model.packed_sequence([latents.shape for latents in inputs["latents"]]))
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([inputs]), model=[model],
                                num_microbatches=1, seq_length=seq, micro_batch_size=1, forward_only=False)
    return {"outputs": outputs[0] if outputs else None, "grads": _global_grads(model)}


def _worker(state: dict, inputs: dict, weights: list[torch.Tensor]) -> dict:
    from megatron.core import parallel_state

    from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel

    results = {}
    for name, overrides in LAYOUTS.items():  # one process group, megatron's groups per layout
        initialize_parallel(tensor_parallel_size=overrides.get("tensor_model_parallel_size", 1),
                            context_parallel_size=overrides.get("context_parallel_size", 1),
                            pipeline_parallel_size=overrides.get("pipeline_model_parallel_size", 1))
        results[name] = _run_layout(overrides, state, inputs, weights)
        parallel_state.destroy_model_parallel()
    destroy_parallel()
    return results


def test_packed_sequence_in_every_layout_matches_one_process(single_process_world):
    config = make_config(**megatron_config_kwargs())
    state = from_official(make_reference().state_dict(), config)
    inputs, weights = packed_inputs(), output_weights()
    model = MfMDiT(config, local_layer_spec())
    fill_from_global(model, state)
    expected = model(**inputs)
    weighted_sum(expected, weights).backward()
    expected_grads = {name: p.grad for name, p in model.named_parameters()}

    for rank, results in enumerate(run_on_ranks(2, _worker, state, inputs, weights)):
        for layout, result in results.items():
            if result["outputs"] is not None:  # the last pipeline stage (every rank elsewhere)
                for out, exp in zip(result["outputs"], expected):
                    assert ((out - exp).norm() / exp.norm()).item() < 1e-5, (layout, rank)
            for name, (global_slice, grad) in result["grads"].items():
                exp = expected_grads[name][global_slice]
                error = (grad - exp).norm().item() / max(exp.norm().item(), 1e-12)
                assert error < 1e-5, (layout, rank, name, error)
