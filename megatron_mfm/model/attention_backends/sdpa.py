"""Core attention through ``F.scaled_dot_product_attention``: the CPU path, and on a GPU either the
SDPA backend timed fastest per shape (``sdpa``) or cuDNN forced (``cudnn`` in the torch-native spec)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_mfm.model.packing import Segments

GPU_SDPA_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
CAPTURABLE_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
"""The timed choices under ``model.cuda_graphs``: cuDNN's fused attention is left out, as graphed
H200 runs that could reach it died with an illegal memory access and those without it trained
(docs/PERFORMANCE.md, session 13)."""
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


class SDPACoreAttention(torch.nn.Module):
    """Bidirectional attention, inputs (S, B, heads, D) -> output (S, B, heads*D); no score matrix
    is materialised by the fused backends. ``kernel`` "timed": on a GPU each shape runs on the
    backend timed fastest for it (``fastest_sdpa_backend``); "cudnn": cuDNN, memory-efficient only
    for inputs cuDNN refuses. The CPU takes
    torch's choice either way (a timed choice would make CPU runs differ in the last bits). A
    model replayed from CUDA graphs (``config.cuda_graphs``) times only flash and memory-efficient."""

    def __init__(self, config, cross_attention: bool, kernel: str = "timed"):
        super().__init__()
        if kernel not in ("timed", "cudnn"):
            raise ValueError(f"SDPACoreAttention kernel={kernel!r}: choose timed or cudnn")
        self.kernel = kernel
        self.candidates = CAPTURABLE_SDPA_BACKENDS if config is not None and config.cuda_graphs else GPU_SDPA_BACKENDS

    def runs_ring(self, query: torch.Tensor, key_padding_mask: torch.Tensor | None) -> bool:
        """SDPA sees only local tokens: ring CP goes through ``ring_attention``."""
        return False

    ring_kernels = None
    """Block kernels for ``ring_attention`` (None: its aten defaults)."""

    cuts_padded_keys = True
    """End-padded keys come cut off, not masked (``attention.attend``): no mask, so flash and
    memory-efficient kernels can run them too."""

    def forward(self, query, key, value, key_padding_mask: torch.Tensor | Segments | None = None) -> torch.Tensor:
        """``key_padding_mask``: (B, S_k) True for real keys, or a packed sequence's ``Segments``
        (a block-diagonal mask: no query sees another sample's keys)."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (B, heads, S, D)
        if isinstance(key_padding_mask, Segments):
            mask = key_padding_mask.mask()[None, None]
        else:
            mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        # on the CPU torch's choice keeps runs bit-reproducible; a traced graph (torch.export) has
        # symbolic shapes to time nothing on, so its runtime picks
        if not q.is_cuda or torch.compiler.is_compiling():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # a packed sequence's block mask: the kernels that take a full mask (flash takes none)
            backends = (CUDNN_FIRST if self.kernel == "cudnn" or isinstance(key_padding_mask, Segments) else
                        [fastest_sdpa_backend(tuple(q.shape), tuple(k.shape), q.dtype, q.device, mask is not None,
                                                 self.candidates)])
            with sdpa_kernel(backends, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.permute(2, 0, 1, 3).flatten(2)


@functools.lru_cache(maxsize=64)
def fastest_sdpa_backend(q_shape: tuple, kv_shape: tuple, dtype: torch.dtype, device: torch.device,
                         masked: bool, candidates: tuple[SDPBackend, ...]) -> SDPBackend:
    """The SDPA backend of ``candidates`` that runs these shapes fastest on this GPU, forward +
    backward, timed once per shape on random inputs (one choice whatever the grad mode, so a
    recomputed forward repeats the original exactly). torch's own pick varies between runs and
    versions; at MfM-2B's self-attention on an H100 flash is 1.47x slower than cuDNN."""
    generator = torch.Generator(device).manual_seed(0)  # leaves the training's random streams alone

    def normal(shape: tuple, requires_grad: bool = False) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_(requires_grad)

    q, k, v = normal(q_shape, True), normal(kv_shape, True), normal(kv_shape, True)
    mask = torch.ones(kv_shape[0], 1, 1, kv_shape[2], device=device, dtype=torch.bool) if masked else None
    grad = normal(q_shape)

    def step() -> None:
        with torch.enable_grad():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)

    timings = {}
    for backend in candidates:
        try:
            with sdpa_kernel(backend):
                step()  # warm-up, and raises when the backend does not take these inputs
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(3):
                    step()
                end.record()
                torch.cuda.synchronize()
        except RuntimeError:
            continue
        timings[backend] = start.elapsed_time(end)
    return min(timings, key=timings.get) if timings else SDPBackend.MATH
