"""Ring (p2p) attention equals softmax attention over the gathered sequence: outputs and q/k/v
gradients, with and without padded keys, on 1 and 3 ranks (an odd ring, one chunk all padding)."""

from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from megatron_mfm.parallel.ring_attention import ring_attention


def reference_attention(q, k, v, key_mask):
    """Softmax attention by its definition. (S, B, H, D) -> (S, B, H*D)."""
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,kbhd->qbhd", scores.softmax(dim=-1), v).flatten(2)


def make_case(tokens: int, padded: int, head_dim: int = 8, seed: int = 3) -> dict:
    """q, k, v (S, B=2, H=3, D); the last ``padded`` keys masked (None when 0), as the
    TokenLayout pads a clip."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(tokens, 2, 3, head_dim, generator=g) for _ in range(3))
    mask = None
    if padded:
        mask = torch.ones(2, tokens, dtype=torch.bool)
        mask[:, tokens - padded :] = False
    return dict(q=q, k=k, v=v, mask=mask, grad=torch.randn(tokens, 2, 3 * head_dim, generator=g))


def expected(case: dict) -> dict:
    q, k, v = (case[n].clone().requires_grad_() for n in "qkv")
    out = reference_attention(q, k, v, case["mask"])
    (out * case["grad"]).sum().backward()
    return dict(out=out.detach(), q=q.grad, k=k.grad, v=v.grad)


def run_ring(case: dict, rows: slice, group) -> dict:
    q, k, v = (case[n][rows].clone().requires_grad_() for n in "qkv")
    out = ring_attention(q, k, v, case["mask"], group)
    (out * case["grad"][rows]).sum().backward()
    return dict(out=out.detach(), q=q.grad, k=k.grad, v=v.grad)


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str, tolerance: float = 1e-5) -> None:
    err = (got - want).norm().item() / (want.norm().item() or 1.0)  # padding keys: zero gradient
    assert err < tolerance, (name, err)


def _ring_worker(case: dict, gpu_dtype: torch.dtype | None = None) -> dict:
    """CPU and gloo; or, given a dtype, the GPU of this rank and NCCL (the CUDA kernels)."""
    import torch.distributed as dist

    dist.init_process_group("gloo" if gpu_dtype is None else "nccl")
    size, rank = dist.get_world_size(), dist.get_rank()
    if gpu_dtype is not None:
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False
        case = {name: t if t is None or t.dtype == torch.bool else t.to(gpu_dtype) for name, t in case.items()}
        case = {name: t if t is None else t.cuda() for name, t in case.items()}
    chunk = case["q"].shape[0] // size
    result = run_ring(case, slice(rank * chunk, (rank + 1) * chunk), dist.group.WORLD)
    dist.destroy_process_group()
    return {name: t.float().cpu() for name, t in result.items()}


def test_three_rank_ring_matches_gathered_attention():
    """An odd ring; 4 of 9 keys padded, so rank 1's chunk is cut and rank 2's is all padding
    (it must contribute nothing, not NaN). The two-rank ring runs inside the model tests
    (tests/test_tensor_parallel.py, tests/test_training.py)."""
    ranks, tokens = 3, 9
    case = make_case(tokens, padded=4)
    want = expected(case)
    chunk = tokens // ranks
    for rank, got in enumerate(run_on_ranks(ranks, _ring_worker, case)):
        rows = slice(rank * chunk, (rank + 1) * chunk)
        for name in ("out", "q", "k", "v"):
            assert_close(got[name], want[name][rows], f"rank {rank} {name}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [0, 700, 1400], ids=["no-padding", "padded", "padding-only-chunk"])
def test_two_gpu_ring_matches_gathered_attention(dtype, tolerance, padded):
    """NCCL and the CUDA kernels (flash for bf16, memory-efficient for fp32)."""
    tokens = 2048
    case = make_case(tokens, padded, head_dim=64)
    want = expected(case)
    for rank, got in enumerate(run_on_ranks(2, _ring_worker, case, dtype)):
        rows = slice(rank * tokens // 2, (rank + 1) * tokens // 2)
        for name in ("out", "q", "k", "v"):
            assert_close(got[name], want[name][rows], f"rank {rank} {name}", tolerance)


@pytest.mark.parametrize("padded", [0, 2], ids=["no-padding", "padded"])
def test_single_rank_ring_is_plain_attention(single_process_world, padded):
    from megatron.core import parallel_state

    case = make_case(7, padded)
    got = run_ring(case, slice(None), parallel_state.get_context_parallel_group())
    for name, want in expected(case).items():
        assert_close(got[name], want, name)


@pytest.mark.parametrize(
    "mask,error",
    [(torch.ones(2, 5, dtype=torch.bool), "covers 5 keys"),
     (torch.tensor([[True] * 6, [True] * 4 + [False] * 2]), "pad the end of the sequence, equally"),
     (torch.tensor([[False] + [True] * 5] * 2), "pad the end of the sequence, equally")],
    ids=["wrong-length", "per-sample-padding", "padding-not-at-end"],
)
def test_unsupported_mask_is_refused(single_process_world, mask, error):
    from megatron.core import parallel_state

    case = make_case(6, 0)
    with pytest.raises(ValueError, match=error):
        ring_attention(case["q"], case["k"], case["v"], mask, parallel_state.get_context_parallel_group())


def test_context_parallel_comm_is_validated_and_relaxes_the_head_check():
    from megatron_mfm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="parallel.context_parallel_comm='ring'"):
        load_config(overrides=["parallel.context_parallel_comm=ring"])
    cp3 = ["model.preset=tiny", "parallel.context_parallel=3", "train.global_batch_size=1", "train.micro_batch_size=1"]
    with pytest.raises(ConfigError, match="does not divide the 4 heads of tiny"):  # a2a splits 4 heads 3 ways
        load_config(overrides=cp3).check_world(3)
    load_config(overrides=[*cp3, "parallel.context_parallel_comm=p2p"]).check_world(3)
