"""Model FLOPs of the MfM DiT: the one formula used by training logs and the profiler.

Counts multiply-adds of every GEMM and convolution as 2 FLOPs, and attention's two batched
matmuls (QK^T and PV). Norms, activations and RoPE are left out (they are not tensor-core
work). Training = 3x forward (backward computes two GEMMs per forward GEMM); recomputation is
not counted (model FLOPs, as MFU is defined).
"""

from __future__ import annotations

import torch

from megatron_mfm.model.config import ADAPTER_CHANNELS, MfMConfig
from megatron_mfm.model.geometry import pixel_shape

PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
    "A100": {"bf16": 312.0},
}
"""Dense tensor-core peaks (TFLOP/s) by GPU name and precision, from the vendors' data sheets."""


def gpu_peak_tflops(precision: str = "bf16", override: float = 0.0) -> tuple[float | None, str]:
    """(this GPU's dense peak for MFU, what it is); (None, why) on the CPU or an unknown GPU.
    MFU is quoted against the bf16 peak, FP8 runs included."""
    if override:
        return override, f"peak_tflops {override:g} (given)"
    if not torch.cuda.is_available():
        return None, "cpu: no MFU"
    name = torch.cuda.get_device_name()
    for gpu, peaks in PEAK_TFLOPS.items():
        if gpu in name and precision in peaks:
            return peaks[precision], f"{name} {precision} dense {peaks[precision]:g} TFLOP/s"
    return None, f"{name}: peak unknown, set the peak TFLOP/s by hand"


def layer_forward_flops(config: MfMConfig, tokens: int, text_tokens: int) -> int:
    """One DiT block on one sample of ``tokens`` video tokens and ``text_tokens`` text tokens."""
    d, ffn, ct = config.hidden_size, config.ffn_hidden_size, config.text_hidden_size
    adaln = 2 * d * 6 * d
    self_proj = 2 * tokens * d * (3 * d) + 2 * tokens * d * d
    self_attn = 2 * 2 * tokens * tokens * d
    cross_proj = 2 * tokens * d * d + 2 * text_tokens * ct * (2 * d) + 2 * tokens * d * d
    cross_attn = 2 * 2 * tokens * text_tokens * d
    mlp = 2 * tokens * d * ffn * 2
    return adaln + self_proj + self_attn + cross_proj + cross_attn + mlp


def adapter_forward_flops(config: MfMConfig, frames: int, height: int, width: int) -> int:
    """The pixel-space condition adapter on one clip of ``frames`` x ``height`` x ``width``."""
    c = ADAPTER_CHANNELS
    flops = 2 * frames * height * width * config.condition_channels * c[0] * 9  # conv_in
    f, h, w = frames, height, width
    for stage in range(len(c) - 1):
        flops += 2 * f * h * w * c[stage] * c[stage] * 9  # 3x3 conv
        h, w = (h + 1) // 2, (w + 1) // 2
        if stage % 2 == 0:  # Conv3d, stride 2 in time too
            f = (f + 1) // 2
            flops += 2 * f * h * w * c[stage] * c[stage + 1] * 27
        else:
            flops += 2 * f * h * w * c[stage] * c[stage + 1] * 9
    return flops + 2 * f * h * w * c[-1] * config.hidden_size * 9  # conv_out


def forward_flops(config: MfMConfig, latent_shape: tuple[int, int, int], text_tokens: int) -> int:
    """One sample's forward FLOPs; ``latent_shape`` = (T, H, W) of the latent."""
    t, h, w = latent_shape
    p, d = config.patch_size, config.hidden_size
    tokens = t * (h // p) * (w // p)
    embed = 2 * tokens * config.in_channels * p * p * d
    timestep = 2 * (256 * d + d * d) * (2 if config.use_motion_score else 1)
    head = 2 * d * 2 * d + 2 * tokens * d * p * p * config.out_channels
    adapter = adapter_forward_flops(config, *pixel_shape((t, h, w)))
    return embed + timestep + adapter + config.num_layers * layer_forward_flops(config, tokens, text_tokens) + head


def training_flops(config: MfMConfig, latent_shape: tuple[int, int, int], text_tokens: int) -> int:
    """Forward + backward FLOPs of one sample."""
    return 3 * forward_flops(config, latent_shape, text_tokens)
