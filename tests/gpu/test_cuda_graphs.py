"""GPU only: ``model.cuda_graphs`` trains as eager mode does. Two runs of the real training step
from the same seed, one replaying each micro-batch shape's forward and backward from CUDA graphs
(images and videos: two captures), give the same per-task losses and the same weights.

    python -m pytest tests/gpu/test_cuda_graphs.py -v
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
