"""Every contiguous backend against the float64 reference: CPU (fp32) and CUDA (fp16/bf16, `gpu`).

A case is (slots, context_lens, query_lens): the context rows are put in the cache first, then
the backend's `forward` writes the new tokens and attends. Checked: the output, the rows written,
and that another layer of the cache is untouched. The NaN-filled cache makes any read past a
request's length visible as NaN in the output.
"""

from __future__ import annotations

import pytest
import torch
from reference import CACHE_LAYOUTS, DenseKVCache, random_requests, reference_attention

from vattention.attention import AttentionMetadata, create_backend

LAYER = 1
CPU_MAX_LEN = 64
CPU_CASES = {
    "decode_len1": ([2], [0], [1]),
    "decode_batch": ([3, 0, 2, 1], [15, 16, 47, 63], [1, 1, 1, 1]),
    "decode_uniform": ([0, 1, 2], [20, 20, 20], [1, 1, 1]),
    "prefill_fresh": ([1, 3], [0, 0], [7, 16]),
    "prefill_uniform": ([1, 2], [0, 0], [9, 9]),
    "chunked": ([0, 2], [16, 5], [8, 3]),
    "mixed": ([2, 0, 3, 1], [0, 20, 33, 10], [5, 1, 1, 12]),
    "max_len_prefill": ([0], [0], [64]),
    "max_len_chunk": ([1], [40], [24]),
}
GPU_MAX_LEN = 4096
GPU_CASES = {
    "decode_len1": ([5], [0], [1]),
    "decode_batch": ([7, 0, 3, 12, 9], [1, 255, 256, 2047, 4095], [1, 1, 1, 1, 1]),
    "decode_uniform": (list(range(8)), [1500] * 8, [1] * 8),
    "prefill_fresh": ([2, 6], [0, 0], [300, 1024]),
    "chunked": ([4, 1], [512, 77], [256, 300]),
    "mixed": ([3, 0, 8, 1, 6], [0, 900, 1700, 128, 0], [200, 1, 1, 333, 1]),
    "max_len": ([10], [3000], [1096]),
}
# "auto:..." are `auto` with options: its mixed-batch split (decode rows by Triton in one
# launch; prefill by SDPA per request, by our Triton prefill kernel, or by one FA2 varlen launch
# with or without cuDNN for long fresh prompts).
VARIANTS = {
    "auto:triton": ("auto", {"decode": "triton_decode", "prefill": "sdpa"}),
    "auto:tri_prefill": ("auto", {"decode": "triton_decode", "prefill": "triton"}),
    "auto:fa2": ("auto", {"prefill": "fa2_varlen", "cudnn_min_tokens": 0}),
    # (cudnn_min_work=0: small shapes take cuDNN too, so the tests reach that path)
    "auto:fa2_cudnn": (
        "auto",
        {"prefill": "fa2_varlen", "cudnn_min_tokens": 256, "cudnn_min_work": 0},
    ),
    # chunks over a cached context as two calls merged by log-sum-exp (`split_chunk`)
    "auto:split": (
        "auto",
        {"prefill": "sdpa", "cudnn_min_tokens": 2, "cudnn_min_work": 0, "split_chunks": True},
    ),
    "auto:tri_split": (
        "auto",
        {
            "decode": "triton_decode",
            "prefill": "triton",
            "cudnn_min_tokens": 6,
            "cudnn_min_work": 0,
            "split_chunks": True,
        },
    ),
    "auto:fa2_split": (
        "auto",
        {
            "prefill": "fa2_varlen",
            "cudnn_min_tokens": 200,
            "cudnn_min_work": 0,
            "split_chunks": True,
        },
    ),
}
ALL_BACKENDS = [
    "torch_sdpa_ref", "sdpa", "flex", "auto", "triton_decode", "fa2_varlen", "auto:triton",
    "auto:tri_prefill", "auto:fa2", "auto:fa2_cudnn", "auto:split", "auto:fa2_split", "auto:tri_split",
]  # fmt: skip
CPU_BACKENDS = [
    "torch_sdpa_ref", "sdpa", "flex", "auto", "triton_decode", "auto:triton", "auto:tri_prefill",
    "auto:split", "auto:tri_split",
]  # fmt: skip
# GQA ratios on the per-layer layout, every layout at ratio 4.
CPU_SHAPES = [
    (1, "per_layer"),
    (4, "per_layer"),
    (8, "per_layer"),
    (4, "cross_layer"),
    (4, "padded"),
]
TOLERANCE = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def is_decode(case: tuple[list[int], list[int], list[int]]) -> bool:
    return all(n == 1 for n in case[2])


def run_case(
    backend_name: str,
    case: tuple[list[int], list[int], list[int]],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    layout: str,
    max_len: int,
    max_slots: int = 16,
) -> None:
    slots, context_lens, query_lens = case
    num_heads = num_kv_heads * group
    cache = DenseKVCache(2, max_slots, max_len, num_kv_heads, head_dim, dtype, device, layout)
    gen = torch.Generator().manual_seed(1234)
    seq_lens = [c + n for c, n in zip(context_lens, query_lens, strict=True)]
    keys, values = random_requests(seq_lens, num_kv_heads, head_dim, dtype, device, gen)
    for slot, c, k, v in zip(slots, context_lens, keys, values, strict=True):
        cache.k_cache(LAYER)[slot, :c] = k[:c]
        cache.v_cache(LAYER)[slot, :c] = v[:c]
    k_new = torch.cat([k[c:] for k, c in zip(keys, context_lens, strict=True)])
    v_new = torch.cat([v[c:] for v, c in zip(values, context_lens, strict=True)])
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(device, dtype)
    meta = AttentionMetadata.build(slots, context_lens, query_lens, device=device)
    name, options = VARIANTS.get(backend_name, (backend_name, {}))
    backend = create_backend(name, cache, num_heads, num_kv_heads, head_dim, **options)

    out = backend.forward(LAYER, q, k_new, v_new, meta)

    assert out.shape == q.shape and out.dtype == dtype
    expected = reference_attention(q, keys, values, query_lens, head_dim**-0.5)
    assert not out.isnan().any(), "NaN in the output: a row past a request's length was read"
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)
    for slot, c, s, k, v in zip(slots, context_lens, seq_lens, keys, values, strict=True):
        assert torch.equal(cache.k_cache(LAYER)[slot, c:s], k[c:])
        assert torch.equal(cache.v_cache(LAYER)[slot, c:s], v[c:])
    assert cache.k_cache(0).isnan().all() and cache.v_cache(0).isnan().all()


def cpu_params() -> list[object]:
    params = []
    for name in CPU_BACKENDS:
        for case_name, case in CPU_CASES.items():
            if name == "triton_decode" and not is_decode(case):
                continue
            for group, layout in CPU_SHAPES:
                params.append(pytest.param(name, case_name, group, layout))
    return params


@pytest.mark.parametrize(("backend", "case", "group", "layout"), cpu_params())
def test_cpu_matches_reference(backend: str, case: str, group: int, layout: str) -> None:
    run_case(backend, CPU_CASES[case], 2, group, 32, torch.float32, "cpu", layout, CPU_MAX_LEN)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("head_dim", [16, 64])
def test_cpu_other_head_dims(backend: str, head_dim: int) -> None:
    run_case(
        backend, CPU_CASES["decode_batch"], 2, 4, head_dim, torch.float32, "cpu", "per_layer", 64
    )
    if backend != "triton_decode":
        run_case(
            backend, CPU_CASES["mixed"], 2, 4, head_dim, torch.float32, "cpu", "cross_layer", 64
        )


def gpu_params() -> list[object]:
    params = []
    for name in ALL_BACKENDS:
        for case_name, case in GPU_CASES.items():
            if name == "triton_decode" and not is_decode(case):
                continue
            for dtype in (torch.bfloat16, torch.float16):
                for layout in CACHE_LAYOUTS:
                    groups = (
                        (1, 4, 8) if dtype == torch.bfloat16 and layout == "per_layer" else (4,)
                    )
                    for group in groups:
                        params.append(pytest.param(name, case_name, group, dtype, layout))
    return params


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "case", "group", "dtype", "layout"), gpu_params())
def test_gpu_matches_reference(
    backend: str, case: str, group: int, dtype: torch.dtype, layout: str
) -> None:
    run_case(backend, GPU_CASES[case], 8, group, 128, dtype, "cuda", layout, GPU_MAX_LEN)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("case", ["decode_batch", "mixed"])
def test_gpu_other_head_dims(backend: str, head_dim: int, case: str) -> None:
    if backend == "triton_decode" and not is_decode(GPU_CASES[case]):
        pytest.skip("triton_decode is decode-only")
    run_case(
        backend, GPU_CASES[case], 4, 4, head_dim, torch.bfloat16, "cuda", "cross_layer", GPU_MAX_LEN
    )
