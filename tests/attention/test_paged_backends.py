"""The PagedAttention baseline's backends against the float64 reference.

Each case writes every request's context through the backend (earlier steps), then runs one step
mixing decode, fresh-prefill and continued-prefill rows; the pools start as NaN, so reading a
token past a request's length (or a wrong block) poisons the output.
"""

from __future__ import annotations

import pytest
import torch
from reference import random_requests, reference_attention

from vattention.attention import (
    AttentionMetadata,
    blocktable,
    create_backend,
    decode_kernels,
    prefill_kernels,
)
from vattention.kvcache.paged import PagedKVCache
from vattention.kvcache.spec import KVCacheSpec

CASES = [
    # (context lengths, new tokens per request)
    ([0, 0, 0], [5, 1, 17]),  # fresh prompts, one of length 1
    ([16, 31, 1], [1, 1, 1]),  # decode at and across block boundaries
    ([7, 0, 40, 15], [1, 9, 1, 16]),  # mixed decode + fresh prefill
    ([20, 3, 0], [12, 1, 33]),  # continued chunk + decode + fresh
    ([33, 8, 5, 0, 47], [31, 24, 1, 9, 2]),  # continued chunks over several tiles, mixed
    ([0], [64]),  # max length
]


def _run(backend_name: str, device: str, dtype: torch.dtype, heads: tuple[int, int], head_dim: int,
         block_size: int, ctx: list[int], new: list[int], tol: float,
         **options: object) -> None:  # fmt: skip
    hq, hkv = heads
    seq = [c + n for c, n in zip(ctx, new, strict=True)]
    blocks = max(64, sum(-(-n // block_size) for n in seq) + 8)
    spec = KVCacheSpec(num_layers=2, num_kv_heads=hkv, head_dim=head_dim, max_slots=6,
                       max_seq_len=max(64, *seq), dtype=dtype)  # fmt: skip
    cache = PagedKVCache(spec, block_size, num_blocks=blocks, device=device)
    cache._k.fill_(float("nan"))
    cache._v.fill_(float("nan"))
    attn = create_backend(backend_name, cache, hq, hkv, head_dim, **options)
    gen = torch.Generator().manual_seed(sum(ctx) + 7 * sum(new))
    keys, values = random_requests(seq, hkv, head_dim, torch.float32, "cpu", gen)
    slots = [cache.alloc_slot() for _ in seq]
    for _ in range(2):  # scatter the blocks: free one slot and take it back later
        tmp = cache.alloc_slot()
        cache.ensure(tmp, 3)
        cache.free_slot(tmp)
    layer = 1
    # Earlier steps: write the context through the backend's own write path.
    for s, c, k, v in zip(slots, ctx, keys, values, strict=True):
        if c:
            cache.ensure(s, c)
            meta = AttentionMetadata.build(
                [s], [0], [c], device, cache.block_tables([s]), block_size
            )
            attn.write_kv(layer, k[:c].to(device, dtype), v[:c].to(device, dtype), meta)
    for s, n in zip(slots, seq, strict=True):
        cache.ensure(s, n)
    meta = AttentionMetadata.build(slots, ctx, new, device, cache.block_tables(slots), block_size)
    q = torch.randn(sum(new), hq, head_dim, generator=gen)
    k_new = torch.cat([k[c:] for k, c in zip(keys, ctx, strict=True)])
    v_new = torch.cat([v[c:] for v, c in zip(values, ctx, strict=True)])
    out = attn.forward(
        layer, q.to(device, dtype), k_new.to(device, dtype), v_new.to(device, dtype), meta
    )
    ref = reference_attention(
        q.double(), [k.double() for k in keys], [v.double() for v in values], new, attn.scale
    )
    err = float((out.double().cpu() - ref).norm() / ref.norm())
    assert not torch.isnan(out).any()
    assert err < tol, err
    cache.check_integrity()


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("case", CASES)
def test_paged_torch_cpu(heads: tuple[int, int], case: tuple[list[int], list[int]]) -> None:
    _run("paged_torch", "cpu", torch.float32, heads, 16, 16, *case, tol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("case", CASES)
def test_pa_triton_cpu_interpreter(
    block_size: int, case: tuple[list[int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the interpreter every prefill row (continued chunks, and fresh prompts: no FA2 on
    the CPU) goes through the shared prefill kernel, never the gather fallback."""

    def no_gather(*args: object) -> None:
        raise AssertionError("pa_triton gathered K/V although Triton can run")

    monkeypatch.setattr(blocktable, "attend_gathered", no_gather)
    _run("pa_triton", "cpu", torch.float32, (8, 2), 16, block_size, *case, tol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_pa_triton_long_fresh_prompts_on_their_new_kv(
    case: tuple[list[int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fresh prompts of >= cudnn_min_tokens attend over their new K/V (one SDPA call each, as
    cuDNN does on CUDA); the rest still go through the kernels, never the gather."""
    calls: list[int] = []
    real = blocktable.sdpa_causal

    def counting(q: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(q.shape[2])
        return real(q, *args)  # type: ignore[arg-type]

    def no_gather(*args: object) -> None:
        raise AssertionError("pa_triton gathered K/V although Triton can run")

    monkeypatch.setattr(blocktable, "sdpa_causal", counting)
    monkeypatch.setattr(blocktable, "attend_gathered", no_gather)
    _run("pa_triton", "cpu", torch.float32, (8, 2), 16, 16, *case, tol=1e-4, cudnn_min_tokens=9,
         cudnn_min_work=12 * 12)  # fmt: skip
    ctx, new = case
    assert sorted(calls) == sorted(n for c, n in zip(ctx, new, strict=True) if c == 0 and n >= 12)


@pytest.mark.parametrize("case", CASES)
def test_pa_triton_cpu_without_triton_falls_back(
    case: tuple[list[int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TRITON_INTERPRET on the CPU no Triton kernel runs: gather-then-SDPA instead."""

    def no_kernel(*args: object, **kwargs: object) -> None:
        raise AssertionError("a Triton kernel ran although Triton cannot run here")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(prefill_kernels, "prefill_attention", no_kernel)
    monkeypatch.setattr(decode_kernels, "decode_attention", no_kernel)
    _run("pa_triton", "cpu", torch.float32, (8, 2), 16, 4, *case, tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["paged_torch", "pa_triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("heads", [(32, 8), (32, 4), (8, 8)])
@pytest.mark.parametrize("case", CASES)
def test_paged_backends_gpu(name: str, dtype: torch.dtype, block_size: int,
                            heads: tuple[int, int], case: tuple[list[int], list[int]]) -> None:  # fmt: skip
    _run(name, "cuda", dtype, heads, 128, block_size, *case, tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 128])
def test_pa_triton_long_continued_chunks_gpu(block_size: int) -> None:
    """Chunks over long cached contexts go through the paged prefill kernel in one launch (the
    gather-then-SDPA path this replaced ran out of memory on 32K contexts)."""
    ctx, new = [8000, 3000, 0, 700], [1024, 1000, 1500, 1]
    _run("pa_triton", "cuda", torch.bfloat16, (32, 8), 128, block_size, ctx, new, tol=2e-2)
