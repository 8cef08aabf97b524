"""``model.cuda_graphs``: what a captured step computes, and the settings it refuses before a run
starts (the capture itself needs a GPU: tests/gpu/test_cuda_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from megatron_mfm.checkpoint.model_state import fill_from_global
from megatron_mfm.config import ConfigError, load_config
from megatron_mfm.export.key_map import from_official
from megatron_mfm.model import MfMDiT, local_layer_spec
from megatron_mfm.model.attention_backends.sdpa import SDPACoreAttention
from megatron_mfm.model.config import make_config
from megatron_mfm.training.components import check_machine
from mfm_cases import make_inputs, make_reference, megatron_config_kwargs

GRAPHS = ["model.cuda_graphs=true", "model.backend=local"]


@pytest.mark.parametrize("frames", [1, 3], ids=["image", "video"])
def test_capturable_forward_equals_the_forward(single_process_world, frames):
    """The forward a graph captures keeps every text row as a masked key, where the forward trims
    the rows no prompt uses after reading the mask on the host: the same output and gradients."""
    model = MfMDiT(make_config(**megatron_config_kwargs()), local_layer_spec())
    fill_from_global(model, from_official(make_reference().state_dict(), model.config))
    inputs = make_inputs(frames)
    inputs["text_mask"] = torch.arange(inputs["text"].shape[1])[None] < torch.tensor([[3], [5]])  # 2 rows unused
    results = []
    for forward in (model, model.capturable_forward):
        model.zero_grad()
        output = forward(**inputs)
        output.square().sum().backward()
        results.append((output.detach(), [p.grad.clone() for p in model.parameters()]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got_grad, want_grad in zip(got_grads, want_grads):
        # fp32 sums over another number of keys: rounding relative to the gradient's scale
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.parametrize("override,reason", [
    ("model.backend=te", "model.backend must be local"),
    ("parallel.tensor_parallel=2", "tensor_parallel, pipeline_parallel and context_parallel must be 1"),
    ("parallel.pipeline_parallel=2", "tensor_parallel, pipeline_parallel and context_parallel must be 1"),
    ("parallel.context_parallel=2", "tensor_parallel, pipeline_parallel and context_parallel must be 1"),
    ("model.recompute=true", "model.recompute must be false"),
    ("model.recompute_modules=[mlp]", "model.recompute must be false"),
    ("train.precision=fp8", "train.precision must not be fp8"),
    ("data.packing.token_budget=4096", "data.packing.token_budget must be 0"),
    ("model.attention_backend=fa4", "model.attention_backend must be auto or sdpa"),
    ("model.attention_backend=cudnn", "model.attention_backend must be auto or sdpa"),
])
def test_settings_a_capture_cannot_hold_fail_when_the_config_loads(override, reason):
    with pytest.raises(ConfigError, match=f"model.cuda_graphs=true: .*{reason}"):
        load_config(overrides=[*GRAPHS, override])


def test_output_recompute_is_allowed():
    config = load_config(overrides=[*GRAPHS, "model.recompute_modules=[layernorm,mlp_act]"])
    assert config.model.cuda_graphs


@pytest.mark.parametrize("graphs", [False, True])
def test_a_graphed_model_never_times_cudnns_fused_attention(graphs):
    """Graphed H200 runs whose SDPA could pick cuDNN's fused attention died with an illegal memory
    access (docs/PERFORMANCE.md, session 13): under graphs its timed choice leaves cuDNN out."""
    model = MfMDiT(make_config(**megatron_config_kwargs(), cuda_graphs=graphs), local_layer_spec())
    attentions = [m for m in model.modules() if isinstance(m, SDPACoreAttention)]
    assert len(attentions) == 2 * len(model.layers)  # self- and cross-attention of each block
    for attention in attentions:
        assert (SDPBackend.CUDNN_ATTENTION in attention.candidates) is not graphs
        assert SDPBackend.EFFICIENT_ATTENTION in attention.candidates


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_the_cpu_refuses_cuda_graphs_before_building_anything():
    with pytest.raises(ConfigError, match="model.cuda_graphs=true captures CUDA graphs: it needs a GPU"):
        check_machine(load_config(overrides=GRAPHS))
