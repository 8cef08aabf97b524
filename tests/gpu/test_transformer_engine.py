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
    from megatron_mfm.checkpoint.model_state import fill_from_global, global_state
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


def _random_te_model(recipe: str | None, **overrides):
    """2-layer TE model, every weight random (same seed, same weights), bf16 or bf16 + FP8."""
    from megatron_mfm.model import MfMDiT, te_layer_spec
    from megatron_mfm.model.config import make_config

    fp8 = dict(fp8="hybrid", fp8_recipe=recipe, fp8_amax_history_len=1024, fp8_amax_compute_algo="max") if recipe else {}
    config = make_config(num_layers=2, hidden_size=256, num_attention_heads=4, text_hidden_size=128,
                         attention_bias=True, params_dtype=torch.bfloat16, bf16=True, **fp8, **overrides)
    model = MfMDiT(config, te_layer_spec()).cuda()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5 if p.dim() > 1 else 0.1 * torch.randn_like(p) + 1)
    return model


def _output_and_grads(model, inputs):
    out = model(**inputs)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_follows_bf16_and_recomputes_exactly(world, recipe):
    """FP8 GEMMs (on a token sequence padded to a multiple of 16 rows, the padding masked in TE's
    self-attention) stay within FP8 rounding of bf16, and full recompute under FP8 (TE's
    checkpoint, re-entering the autocast) gives the gradients of no recompute."""
    bf16 = _random_te_model(None)
    # 5 x 7 x 11 = 385 tokens: FP8 pads them to 400 (masked), bf16 does not
    inputs = _inputs(bf16.config, torch.bfloat16, h=14, w=22)
    out_bf16, _ = _output_and_grads(bf16, inputs)
    out_fp8, grads = _output_and_grads(_random_te_model(recipe), inputs)
    recomputed = _random_te_model(recipe, recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=1)
    out_recomputed, grads_recomputed = _output_and_grads(recomputed, inputs)
    err = ((out_fp8 - out_bf16).norm() / out_bf16.norm()).item()
    worst = max(((grads_recomputed[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in grads.items())
    print(f"fp8 {recipe}: output rel err vs bf16 {err:.2e}; recompute vs none: output "
          f"{(out_recomputed - out_fp8).abs().max().item():.2e}, worst gradient rel err {worst:.2e}")
    assert err < 0.1
    assert torch.equal(out_recomputed, out_fp8) and worst < 1e-2


@pytest.mark.parametrize("option", ["mlp_act", "layernorm"])
def test_output_recompute_keeps_less_and_changes_nothing(world, option):
    """``mlp_act`` / ``layernorm`` on TE linears in bf16: the same output (bits) and gradients
    (attention backward may accumulate in another order), and one (tokens x batch x 4D) bf16
    activation / three (tokens x batch x D) ones less kept per block at the end of the forward."""
    field = {"mlp_act": "recompute_mlp_activation", "layernorm": "recompute_norm_outputs"}[option]
    inputs = _inputs(_random_te_model(None).config, torch.bfloat16)
    results = {}
    for recompute in (False, True):
        model = _random_te_model(None, **{field: recompute})
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(**inputs)
        kept = torch.cuda.memory_allocated() - before
        (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
        results[recompute] = out.detach(), {n: p.grad.float() for n, p in model.named_parameters()}, kept
    (out, grads, kept), (out_freed, grads_freed, kept_freed) = results[False], results[True]
    config = _random_te_model(None).config
    tokens = 5 * (16 // 2) * (24 // 2) * 2  # frames x patches x batch
    width = config.ffn_hidden_size if option == "mlp_act" else 3 * config.hidden_size
    freed_bytes = config.num_layers * tokens * width * 2
    worst = max(((grads_freed[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in grads.items())
    print(f"{option}: kept {kept / 2**20:.1f} -> {kept_freed / 2**20:.1f} MiB, worst gradient rel err {worst:.2e}")
    assert torch.equal(out_freed, out) and worst < 1e-2
    assert kept - kept_freed >= 0.95 * freed_bytes


def test_fp8_fc2_keeps_no_bf16_copy_of_its_input(world):
    """Why ``mlp_act`` does nothing under FP8: a TE linear in bf16 keeps its bf16 input alive for
    the weight gradient (what ``mlp_act`` frees), in FP8 only its own quantized copies (which
    take more bytes than the bf16 input at delayed scaling: 12.5 against 8 MiB on an H200)."""
    import weakref

    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    linear = te.Linear(1024, 256, params_dtype=torch.bfloat16, device="cuda")
    alive = {}
    for fp8 in (False, True):
        for _ in range(2):  # the first call allocates workspaces and FP8 state
            leaf = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            x = leaf * 1  # not a leaf: only what the linear saves keeps it alive
            with te.fp8_autocast(enabled=fp8, fp8_recipe=DelayedScaling()):
                out = linear(x)
            watcher = weakref.ref(x)
            del x
            alive[fp8] = watcher() is not None
            del out, leaf
    assert alive == {False: True, True: False}, alive
