"""GPU only: ``model.cuda_graphs`` trains as eager mode does. Two runs of the real training step
from the same seed, one replaying each micro-batch shape's forward and backward from CUDA graphs
(images and videos: two captures), give the same per-task losses and the same weights.

    python -m pytest tests/gpu/test_cuda_graphs_gpu.py -v
"""

from __future__ import annotations

import pytest
import torch

from megatron_mfm.config import load_config
from megatron_mfm.training.loop import setup, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 5
# attention: SDPA in both runs, auto's choice under graphs
RUN = ["model.backend=local", "model.attention_backend=sdpa", "model.num_layers=2", "train.micro_batch_size=4",
       "train.global_batch_size=8",
       "data.synthetic.frames=5", "data.synthetic.height=32", "data.synthetic.width=32",
       "data.synthetic.image_fraction=0.5", "checkpoint.save=", "checkpoint.interval=0", "train.ema_decay=0.9"]
# bf16: the graphs' cross-attention keeps all 77 text rows (masked) where eager mode trims them,
# another kernel shape, so another bf16 rounding (fp32 is a few ulps apart)
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


def _run(precision: str, graphs: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    trainer = setup(load_config(overrides=[*RUN, f"train.precision={precision}", f"model.cuda_graphs={graphs}"]))
    losses = [train_step(trainer).task_losses.cpu() for _ in range(STEPS)]
    captured = trainer.model[0].captured_steps
    weights = [p.detach().float().cpu() for p in trainer.model.parameters()]
    trainer.loader.close()
    return losses, weights, captured.captures if captured is not None else 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captured_steps_train_as_eager(single_process_world, precision):
    eager_losses, eager_weights, _ = _run(precision, graphs=False)
    losses, weights, shapes = _run(precision, graphs=True)
    assert shapes == 2, "the run's steps should hold both an image and a video micro-batch"
    tolerance = TOLERANCE[precision]
    for step, (got, want) in enumerate(zip(losses, eager_losses)):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=f"step {step}")
    for got, want in zip(weights, eager_weights):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backend", ["fa4", "cudnn", "sdpa"])
def test_core_attention_replays_as_eager_at_the_recipe_shape(backend):
    """Each core attention's forward and backward captured alone at the convergence recipe's
    video self-attention (256 clips of 48 tokens, 16 heads of 64, bf16) and replayed on new
    inputs gives what eager mode gives. The recipe's graphed runs at batch 256 failed with an
    illegal memory access with FA4 and cuDNN self-attention (docs/PERFORMANCE.md, session 12)."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_mfm.model.attention_backends import core_attention_spec, unavailable_reason

    reason = unavailable_reason(backend, sixteen_bit=True)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    attention = build_module(core_attention_spec(backend, False), config=None, cross_attention=False)
    generator = torch.Generator("cuda").manual_seed(0)

    def inputs() -> list[torch.Tensor]:
        return [torch.randn(48, 256, 16, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
                for _ in range(4)]  # q, k, v (S, B, heads, D) and the output's gradient

    def step(q, k, v, grad):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = attention(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    static = inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        captured = step(*static)
    for _ in range(3):
        given = inputs()
        for into, value in zip(static, given):
            into.copy_(value)
        graph.replay()
        for got, want in zip(captured, step(*given)):  # backward kernels may sum in another order
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
