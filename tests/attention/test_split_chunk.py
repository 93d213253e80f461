"""`split_chunk`: a chunk over a cached context as a context call plus a causal call, merged by
log-sum-exp, equals bottom-right causal attention (CPU reference path; cuDNN on the GPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vattention.attention.split_chunk import (
    attend_lse,
    cudnn_lse_usable,
    merge_lse,
    reference_chunk,
    split_chunk_attention,
)


def _qkv(heads: int, kv_heads: int, n: int, s: int, d: int, dtype: torch.dtype, device: str,
         seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, heads, n, d, generator=gen, device=device, dtype=dtype)
    # K and V as strided views of one token-major tensor, as the cache's slot views are
    kv = torch.randn(1, s, 2, kv_heads, d, generator=gen, device=device, dtype=dtype)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(
    group=st.sampled_from([1, 2, 4]),
    kv_heads=st.integers(1, 3),
    n=st.integers(1, 40),
    context=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
)
def test_split_equals_bottom_right_causal(
    group: int, kv_heads: int, n: int, context: int, seed: int
) -> None:
    q, k, v = _qkv(group * kv_heads, kv_heads, n, context + n, 16, torch.float32, "cpu", seed)
    out = split_chunk_attention(q, k, v, 0.25)
    ref = reference_chunk(q, k, v, 0.25)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(1, 47), seed=st.integers(0, 2**31 - 1))
def test_merge_of_any_key_partition_is_full_attention(cut: int, seed: int) -> None:
    q, k, v = _qkv(4, 2, 5, 48, 8, torch.float32, "cpu", seed)
    o1, l1 = attend_lse(q, k[:, :, :cut], v[:, :, :cut], 0.3, causal=False)
    o2, l2 = attend_lse(q, k[:, :, cut:], v[:, :, cut:], 0.3, causal=False)
    full, lse = attend_lse(q, k, v, 0.3, causal=False)
    torch.testing.assert_close(merge_lse(o1, l1, o2, l2), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.logaddexp(l1, l2), lse, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 130),
    d=st.sampled_from([8, 24, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_one_pass_merge_writes_a_token_major_view(
    n: int, d: int, dtype: torch.dtype, seed: int
) -> None:
    """The Triton merge (interpreted here) equals the torch algebra, rounded once, written
    straight into the request's rows of a `[tokens, H, D]` output buffer, nothing else."""
    from vattention.attention.lse_merge import merge_into

    gen = torch.Generator().manual_seed(seed)
    heads = 3
    o1, o2 = (torch.randn(1, heads, n, d, generator=gen).to(dtype) for _ in range(2))
    l1, l2 = (torch.randn(1, heads, n, generator=gen) * 4 for _ in range(2))
    buf = torch.full((n + 5, heads, d), 7.0, dtype=dtype)
    view = buf[2 : 2 + n].transpose(0, 1).unsqueeze(0)
    assert merge_into(o1, l1, o2, l2, view) is view
    w1 = torch.sigmoid(l1 - l2).unsqueeze(-1)
    want = (o2.float() + (o1.float() - o2.float()) * w1).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(view, want, rtol=tol, atol=tol)
    assert (buf[:2] == 7).all() and (buf[2 + n :] == 7).all()
    torch.testing.assert_close(merge_lse(o1, l1, o2, l2), want, rtol=tol, atol=tol)  # torch


def test_merge_rejects_a_view_without_unit_stride_rows() -> None:
    from vattention.attention.lse_merge import merge_into

    o = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="unit-stride D"):
        merge_into(o, torch.zeros(1, 2, 4), o, torch.zeros(1, 2, 4), torch.zeros(1, 2, 8, 4).mT)


def test_bad_shapes_are_rejected() -> None:
    q, k, v = _qkv(2, 1, 4, 4, 8, torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match="0 < new tokens < keys"):
        split_chunk_attention(q, k, v, 1.0)  # no context: a fresh prompt, not a chunk
    with pytest.raises(ValueError, match="as many queries as keys"):
        attend_lse(q[:, :, :2], k, v, 1.0, causal=True)


def test_cudnn_probe_is_false_off_cuda() -> None:
    assert not cudnn_lse_usable(torch.device("cpu"), torch.float32, 4, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "context"), [(128, 1), (300, 700), (2048, 6000)])
def test_cudnn_split_matches_reference(dtype: torch.dtype, n: int, context: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert cudnn_lse_usable(torch.device("cuda", 0), dtype, 32, 8)
    q, k, v = _qkv(32, 8, n, context + n, 128, dtype, "cuda", n + context)
    out = split_chunk_attention(q, k, v, 128**-0.5).float()
    ref = reference_chunk(q, k, v, 128**-0.5)
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 1e-2
