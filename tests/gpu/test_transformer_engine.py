"""GPU only: the Transformer Engine spec equals the torch-native spec (forward and gradients).

Run on a GPU machine with TE installed: python -m pytest tests/gpu -v
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(scope="module")
def world():
    from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(seed=0)
    yield
    destroy_parallel()


def _inputs(config, dtype, frames=5, h=16, w=24, batch=2):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, 77)
    mask[0, 20:] = 0
    return dict(
        latents=torch.randn(batch, 16, frames, h, w, generator=g).cuda().to(dtype),
        timestep=torch.tensor([900.0, 150.0]).cuda(),
        text=torch.randn(batch, 77, config.text_hidden_size, generator=g).cuda().to(dtype),
        text_mask=mask.cuda(),
        condition=torch.randn(batch, 5, 4 * (frames - 1) + 1, 8 * h, 8 * w, generator=g).cuda().to(dtype),
        motion_score=torch.tensor([5.0, 0.0]).cuda(),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_te_spec_matches_local_spec(world, dtype):
    from megatron_mfm.export.model_checkpoint import fill_from_global, global_state
    from megatron_mfm.model import MfMDiT, local_layer_spec, te_layer_spec
    from megatron_mfm.model.config import make_config

    torch.backends.cuda.matmul.allow_tf32 = False
    config = make_config(num_layers=2, hidden_size=256, num_attention_heads=4, text_hidden_size=128,
                         attention_bias=True, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    local = MfMDiT(config, local_layer_spec()).cuda()
    with torch.no_grad():  # official init zeroes the adaLN/head: make every path matter
        for p in local.parameters():
            p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5 if p.dim() > 1 else 0.1 * torch.randn_like(p) + (p == 1))
    te = MfMDiT(config, te_layer_spec()).cuda()
    fill_from_global(te, global_state(local))
    inputs = _inputs(config, dtype)
    out_local, out_te = local(**inputs), te(**inputs)
    err = ((out_te.float() - out_local.float()).norm() / out_local.float().norm()).item()
    weight = torch.randn_like(out_local)
    (out_local * weight).float().sum().backward()
    (out_te * weight).float().sum().backward()
    grads_local = dict(local.named_parameters())
    worst = max(
        ((p.grad.float() - grads_local[n].grad.float()).norm() / grads_local[n].grad.float().norm().clamp_min(1e-12)).item()
        for n, p in te.named_parameters()
    )
    print(f"{dtype}: output rel err {err:.2e}, worst gradient rel err {worst:.2e}")
    tol = 1e-3 if dtype == torch.float32 else 3e-2  # TE's fp32 GEMMs run in TF32 by default
    assert err < tol and worst < 10 * tol


def test_auto_spec_picks_te_on_gpu():
    from megatron_mfm.model.specs import default_layer_spec, transformer_engine_available

    assert transformer_engine_available()
    spec = default_layer_spec("auto")
    assert "TE" in spec.submodules.self_attention.submodules.linear_qkv.__name__
