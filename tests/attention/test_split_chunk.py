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
