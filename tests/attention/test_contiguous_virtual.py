"""Contiguous backends over the real `VirtualKVCache`: only backed rows exist there.

Lengths are picked so that requests end inside a partly used page and cross page boundaries;
a backend that read past a request's length into an unmapped page would crash the process
(SIGSEGV on the CPU backend, an illegal address on CUDA), so passing means no over-read.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from reference import random_requests, reference_attention

from vattention.attention import AttentionMetadata, create_backend
from vattention.kvcache.spec import KVCacheSpec
from vattention.kvcache.virtual import VirtualKVCache

# (context_lens, query_lens) of two requests over four steps: prompt chunks, then decode.
SCHEDULE = [
    ([0, 0], [100, 300]),
    ([100, 300], [71, 213]),
    ([171, 513], [1, 1]),
    ([172, 514], [1, 1]),
]
KINDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_spec(kind: str, layout: str) -> KVCacheSpec:
    if kind == "cpu":  # 64 KiB pages: 512 tokens per-layer, 170.7 tokens cross-layer
        return KVCacheSpec(3, 2, 16, 4, 700, torch.float32, 64 * 1024, layout)
    return KVCacheSpec(4, 8, 128, 4, 2000, torch.bfloat16, None, layout)  # 2 MiB pages


@pytest.fixture
def cache_factory() -> Iterator[list[VirtualKVCache]]:
    caches: list[VirtualKVCache] = []
    yield caches
    for c in caches:
        c.close()


def backends_for(kind: str) -> list[str]:
    names = ["torch_sdpa_ref", "sdpa", "flex", "auto"]
    return names + (["fa2_varlen"] if kind == "cuda" else [])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["per_layer", "cross_layer", "cross_layer_kv"])
def test_backends_read_only_backed_rows(
    kind: str, layout: str, cache_factory: list[VirtualKVCache]
) -> None:
    spec = make_spec(kind, layout)
    cache = VirtualKVCache(spec, backend=kind, budget_bytes=256 * 2**20)
    cache_factory.append(cache)
    slots = [cache.alloc_slot(), cache.alloc_slot()]
    group, dim, layer = 4, spec.head_dim, spec.num_layers - 1
    tol = 2e-4 if spec.dtype == torch.float32 else 4e-2
    gen = torch.Generator().manual_seed(11)
    totals = [c + n for c, n in zip(*SCHEDULE[-1], strict=True)]
    keys, values = random_requests(totals, spec.num_kv_heads, dim, spec.dtype, cache.device, gen)
    names = backends_for(kind)
    backends = {
        n: create_backend(n, cache, spec.num_kv_heads * group, spec.num_kv_heads, dim)
        for n in names
    }
    for step, (context_lens, query_lens) in enumerate(SCHEDULE):
        seq_lens = [c + n for c, n in zip(context_lens, query_lens, strict=True)]
        cache.step(dict(zip(slots, seq_lens, strict=True)))
        meta = AttentionMetadata.build(slots, context_lens, query_lens, device=cache.device)
        k_new = torch.cat([k[c:s] for k, c, s in zip(keys, context_lens, seq_lens, strict=True)])
        v_new = torch.cat([v[c:s] for v, c, s in zip(values, context_lens, seq_lens, strict=True)])
        q = torch.randn(sum(query_lens), spec.num_kv_heads * group, dim, generator=gen)
        q = q.to(cache.device, spec.dtype)
        expected = reference_attention(
            q,
            [k[:s] for k, s in zip(keys, seq_lens, strict=True)],
            [v[:s] for v, s in zip(values, seq_lens, strict=True)],
            query_lens,
            dim**-0.5,
        )
        active = list(backends.items())
        if meta.is_decode_only:
            active.append(
                (
                    "triton_decode",
                    create_backend("triton_decode", cache, q.shape[1], spec.num_kv_heads, dim),
                )
            )
        for name, backend in active:
            out = backend.forward(layer, q, k_new, v_new, meta)
            torch.testing.assert_close(
                out.double(), expected, atol=tol, rtol=0, msg=f"{name} step {step}"
            )
    cache.check_integrity()
