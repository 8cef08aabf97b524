"""The plain-PyTorch baseline of ``--compare-plain``: ``benchmarks/plain_mfm.py`` trained from our
row's initial weights on the same inputs, with PyTorch's AdamW, timed like our step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from benchmarks.plain_mfm import ReferenceMfM, sdpa_attention
from benchmarks.timing import release_memory, timed
from megatron_mfm.checkpoint.model_state import OfficialTensors
from megatron_mfm.config import OptimizerConfig, RunConfig
from megatron_mfm.diffusion.flow_matching import per_sample_mse
from megatron_mfm.model.config import MfMConfig, to_official_config
from megatron_mfm.model.dit import MfMDiT
from megatron_mfm.training.flops import gpu_peak_tflops
from megatron_mfm.training.components import build_model
from megatron_mfm.training.loop import Trainer

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


@dataclass
class PlainCase:
    """What a row's plain step shares with ours: the sizes, our initial weights (official names,
    on the CPU while our model is freed), the inputs and target, the optimizer settings and
    whether each block is recomputed."""

    config: MfMConfig
    weights: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    target: torch.Tensor
    optimizer: OptimizerConfig
    recompute: bool

    @classmethod
    def before_training(cls, trainer: Trainer, inputs: dict[str, torch.Tensor], target: torch.Tensor,
                        recompute: bool) -> PlainCase:
        """Taken before our first step, which updates the weights in place. The model config is
        built afresh: megatron's DDP leaves its methods in the trainer's, which would keep our
        whole trainer alive while the case is (through the plain and official steps)."""
        return cls(trainer.config.to_model_config(), cpu_weights(trainer.model[0]), inputs, target,
                   trainer.config.optimizer, recompute)


def cpu_weights(model: MfMDiT) -> dict[str, torch.Tensor]:
    """The model's weights under the official names, copied to the CPU (on the CPU ``.cpu()``
    would alias them, and our step updates them in place)."""
    return {name: t.to("cpu", copy=True) for name, t in OfficialTensors(model)}


def initial_weights(config: RunConfig) -> tuple[MfMConfig, dict[str, torch.Tensor]]:
    """Our model's initial weights (official names, on the CPU) without our trainer: the chunks
    are built as ``training.loop.setup`` builds them (same checks, process groups, seeds and
    device), so the weights are bit for bit those our rows start from, but without DDP's gradient
    buffers and the optimizer's master weights; the model is freed before this returns, so a
    process that times another model holds only these CPU copies."""
    model_config, model = build_model(config)
    weights = cpu_weights(model[0])
    del model
    release_memory()  # the chunks' reference cycles, and the device memory they held
    return model_config, weights


class Checkpointed(torch.nn.Module):
    """A block whose activations are recomputed in backward (what ``model.recompute=true`` does
    to ours), keeping only its inputs."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=False)


def build_plain(case: PlainCase, backends: list[str]) -> ReferenceMfM:
    """The plain model on the inputs' device and dtype with our initial weights (built on the
    meta device: no transient fp32 copy of a large model)."""
    latents = case.inputs["latents"]
    attention = sdpa_attention([SDPA_BACKENDS[name] for name in backends])
    with torch.device("meta"):
        model = ReferenceMfM.from_official_config(to_official_config(case.config), attention)
    model = model.to(latents.dtype).to_empty(device=latents.device)
    model.load_state_dict(case.weights)
    if case.recompute:
        model.transformer_blocks = torch.nn.ModuleList(Checkpointed(b) for b in model.transformer_blocks)
    return model


def time_plain(args, case: PlainCase) -> dict:
    """Step time, peak memory and losses of the plain training step: forward, MSE, backward,
    gradient clipping, AdamW (decay on matrices only, as megatron's optimizer)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = build_plain(case, args.plain_sdpa_backends)
    params, opt = list(model.parameters()), case.optimizer
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() > 1]}, {"params": [p for p in params if p.dim() == 1],
                                                          "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay,
        fused=torch.cuda.is_available(),
    )
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = per_sample_mse(model(**case.inputs), case.target).mean()
        loss.backward()
        if opt.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, opt.clip_grad)
        optimizer.step()
        losses.append(loss.detach())

    seconds = timed(step, args.iterations, args.warmup)
    return {
        "plain_step_s": seconds,
        "plain_peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "plain_losses": torch.stack(losses[-args.iterations:]).float().tolist(),
    }


def compare_with_plain(args, row: dict, case: PlainCase, measured: dict) -> dict:
    """The row's plain columns. Rows whose plain step is the same share one run (fp8 rows compare
    against the bf16 plain step; full and partial recompute both checkpoint every plain block); an
    out-of-memory plain model is reported, not raised."""
    key = (row["preset"], row["frames"], row["height"], row["width"], case.recompute, case.target.dtype)
    if key not in measured:
        try:
            measured[key] = time_plain(args, case)
        except torch.OutOfMemoryError:
            measured[key] = {"plain_error": "out of memory"}
        release_memory()
    plain = measured[key]
    columns = {"plain_attention": "sdpa:" + ",".join(args.plain_sdpa_backends), **plain}
    if "plain_error" in plain:
        return columns
    tflops = row["flops_per_step"] / plain["plain_step_s"] / 1e12
    peak, _ = gpu_peak_tflops("bf16" if row["precision"] == "fp8" else row["precision"], args.peak_tflops)
    return {**columns, "plain_tflops_per_gpu": tflops, "plain_mfu": tflops / peak if peak else None,
            "speedup_vs_plain": plain["plain_step_s"] / row["step_s"]}
