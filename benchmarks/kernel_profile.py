"""Where a step's GPU time goes: the roofline of one block's kernels timed alone, and the
measured kernel time of a profiled step summed by category."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from benchmarks.timing import TEXT_TOKENS, synchronize, timed
from megatron_mfm.model.config import MfMConfig


def kernel_roofline_seconds(config: MfMConfig, tokens: int, batch: int, dtype, device, repeats: int) -> float:
    """Sum over this stage's blocks of the best fwd+bwd time of each GEMM (this rank's share of
    the tokens and of the weights) and attention (all tokens, this rank's heads), timed alone."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    d, ffn, ct = config.hidden_size, config.ffn_hidden_size, config.text_hidden_size
    block = block_kernel_seconds(d, ffn, ct, config.num_attention_heads // (tp * cp), config.kv_channels, tp, cp,
                                 tokens, batch, dtype, device, repeats)
    return block * config.num_layers / pp


@functools.lru_cache(maxsize=None)
def block_kernel_seconds(d: int, ffn: int, ct: int, heads: int, hd: int, tp: int, cp: int, tokens: int, batch: int,
                         dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """One block's GEMMs and attentions timed alone (cached: rows of a sweep share the shapes).
    Attention takes the fastest SDPA backend that runs it (cuDNN, flash, memory-efficient on a
    GPU: the default choice varies between runs)."""
    m, mt = batch * -(-tokens // cp), batch * TEXT_TOKENS
    gemms = [(m, d, 3 * d // tp), (m, d // tp, d), (m, d, d // tp), (mt, ct, 2 * d // tp), (m, d // tp, d),
             (m, d, ffn // tp), (m, ffn // tp, d)]
    total = 0.0
    for rows, k, n in gemms:
        x = torch.randn(rows, k, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(k, n, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(rows, n, device=device, dtype=dtype)
        total += timed(lambda: (x @ w).backward(grad), repeats, 2)
    backends = ([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
                if device.type == "cuda" else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
    for q_len, kv_len, q_heads in ((tokens, tokens, heads), (m // batch, TEXT_TOKENS, heads * cp)):
        q = torch.randn(batch, q_heads, q_len, hd, device=device, dtype=dtype, requires_grad=True)
        kv = torch.randn(batch, q_heads, kv_len, hd, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch, q_heads, q_len, hd, device=device, dtype=dtype)
        times = []
        for backend in backends:
            try:
                with sdpa_kernel(backend):
                    times.append(timed(lambda: F.scaled_dot_product_attention(q, kv, kv).backward(grad), repeats, 2))
            except RuntimeError:  # this backend does not take these shapes or this dtype here
                continue
        total += min(times)
    return total


KERNEL_CATEGORIES = (
    ("attention", r"sdpa|flash|fmha|attn|attention"),
    # cuDNN's NCHW <-> NHWC transposes around each adapter convolution count with it (the
    # recipe's trace: ~90 a step, 12% of its kernel time), not as "other elementwise"
    ("convolution", r"conv|implicit_gemm|fprop|dgrad|wgrad|nchwToNhwc|nhwcToNchw"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|matmul|::mm$|::addmm|::bmm"),
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|send|recv"),
    ("optimizer", r"multi_tensor|adam|l2norm"),
    ("fp8 casts", r"(?<!no)cast|transpose|amax|quantize|fp8"),
    ("compiled glue", r"triton"),
    ("norms", r"norm"),
    ("memory copies", r"memcpy|memset|copy"),
    ("other elementwise", r""),
)


def kernel_category(name: str) -> str:
    return next(label for label, pattern in KERNEL_CATEGORIES if re.search(pattern, name, re.IGNORECASE))


def kernel_breakdown(step, top: int = 12, trace: Path | None = None) -> dict:
    """One more step under torch.profiler: seconds of GPU kernels per category, their sum (the
    GPU's busy time, to read against the step time), the top kernels, and the top operators by
    the kernel time they launch, with their input shapes (a kernel's name such as
    ``vectorized_elementwise_kernel`` does not say which tensor of the model it touched). On the
    CPU the operators' own CPU times stand in for kernels. ``trace``: where to write the step's
    Chrome trace, with Python stacks (``benchmarks/trace_gaps.py`` names the code the GPU waited on)."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True, with_stack=trace is not None) as profiler:
        step()
        synchronize()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(trace))
    kernels = {}
    for event in profiler.key_averages():
        on_device = event.device_type == DeviceType.CUDA
        # a ``record_function`` range (the optimizer's "Optimizer.step#FusedAdam.step") is a span
        # over kernels counted on their own: counted too, it read 1.122 s of busy GPU in a 1.108 s step
        if cuda != on_device or event.is_user_annotation:
            continue
        microseconds = event.device_time_total if cuda else event.self_cpu_time_total
        if microseconds > 0:
            kernels[event.key] = (microseconds / 1e6, event.count)
    categories = {label: 0.0 for label, _ in KERNEL_CATEGORIES}
    for name, (seconds, _) in kernels.items():
        categories[kernel_category(name)] += seconds
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])[:top]
    return {"kernel_seconds": {k: v for k, v in categories.items() if v > 0},
            "kernel_busy_s": sum(categories.values()),
            "top_kernels": [{"name": name[:160], "seconds": s, "calls": n} for name, (s, n) in ranked],
            "top_operators": top_operators(profiler, cuda, 3 * top)}


def top_operators(profiler, cuda: bool, top: int) -> list[dict]:
    """Host operators by the kernel time they launch themselves, per input shape."""
    operators = []
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.device_type == DeviceType.CUDA or event.is_user_annotation:
            continue
        microseconds = event.self_device_time_total if cuda else event.self_cpu_time_total
        if microseconds > 0:
            operators.append({"name": event.key, "shapes": str(event.input_shapes)[:200],
                              "seconds": microseconds / 1e6, "calls": event.count})
    return sorted(operators, key=lambda operator: -operator["seconds"])[:top]
