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


def _run(precision: str, graphs: bool,
         compile_glue: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    trainer = setup(load_config(overrides=[*RUN, f"train.precision={precision}", f"model.cuda_graphs={graphs}",
                                           f"model.compile_glue={compile_glue}"]))
    losses = [train_step(trainer).task_losses.cpu() for _ in range(STEPS)]
    captured = trainer.model[0].captured_steps
    weights = [p.detach().float().cpu() for p in trainer.model.parameters()]
    trainer.loader.close()
    return losses, weights, captured.captures if captured is not None else 0


@pytest.mark.parametrize("compile_glue", [False, True], ids=["eager-glue", "compiled-glue"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captured_steps_train_as_eager(single_process_world, precision, compile_glue):
    """The compiled glue's kernels (the convergence recipe's) are captured as they ran in warm-up."""
    eager_losses, eager_weights, _ = _run(precision, graphs=False, compile_glue=compile_glue)
    losses, weights, shapes = _run(precision, graphs=True, compile_glue=compile_glue)
    assert shapes == 2, "the run's steps should hold both an image and a video micro-batch"
    tolerance = TOLERANCE[precision]
    for step, (got, want) in enumerate(zip(losses, eager_losses)):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=f"step {step}")
    for got, want in zip(weights, eager_weights):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("keys", [48, 77], ids=["self", "masked-cross"])
def test_graphed_sdpa_replays_as_eager_at_the_recipe_shape(keys):
    """The core attention of a graphed model, captured alone at the convergence recipe's video
    attentions (256 clips of 48 tokens, 16 heads of 64, bf16; the text cross-attention's 77 keys
    partly masked) and replayed on new inputs, gives what eager mode gives, on a backend timed
    without cuDNN's fused attention (graphed recipe runs that could reach it died with an illegal
    memory access; docs/PERFORMANCE.md, session 13)."""
    from torch.nn.attention import SDPBackend

    from megatron_mfm.model.attention_backends.sdpa import SDPACoreAttention, fastest_sdpa_backend
    from megatron_mfm.model.config import make_config

    config = make_config(num_layers=1, hidden_size=1024, num_attention_heads=16, cuda_graphs=True)
    attention = SDPACoreAttention(config, cross_attention=keys != 48)
    mask = (torch.arange(keys, device="cuda") < keys - 20).expand(256, keys) if keys != 48 else None
    generator = torch.Generator("cuda").manual_seed(0)

    def inputs() -> list[torch.Tensor]:  # q, k, v (S, B, heads, D) and the output's (S, B, heads*D) gradient
        q, k, v, grad = (torch.randn(rows, 256, 16, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
                         for rows in (48, keys, keys, 48))
        return [q, k, v, grad.flatten(2)]

    def step(q, k, v, grad):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = attention(q, k, v, mask)
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
    shapes = ((256, 16, 48, 64), (256, 16, keys, 64), torch.bfloat16, static[0].device, mask is not None)
    assert fastest_sdpa_backend(*shapes, attention.candidates) != SDPBackend.CUDNN_ATTENTION
