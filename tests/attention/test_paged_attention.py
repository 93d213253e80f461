"""The paged backends (`paged_torch`, `paged_triton`, `paged_flex`) against the float64 reference.

Each case writes every request's context through the backend's own write path (earlier steps),
then runs one step mixing decode, fresh-prefill and continued-prefill rows. Blocks are scattered
(other slots take and return blocks first). Unwritten pool rows hold NaN, so a kernel reading a
token past a request's length or a wrong block poisons its output; eager flex (the CPU path)
multiplies every masked entry by zero, so its pools hold a large finite value instead.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from reference import random_requests, reference_attention

from vattention.attention import AttentionMetadata, create_backend
from vattention.kvcache.paged import PagedKVCache
from vattention.kvcache.spec import KVCacheSpec

CASES = [  # (context lengths, new tokens per request)
    ([0, 0, 0], [5, 1, 17]),  # fresh prompts, one of length 1
    ([15, 16, 31, 1], [1, 1, 1, 1]),  # decode at and across block boundaries
    ([7, 0, 40, 15], [1, 9, 1, 16]),  # mixed decode + fresh prefill
    ([20, 3, 0], [12, 1, 33]),  # continued chunk + decode + fresh
    ([0], [64]),  # a whole slot in one prefill
    ([63, 30], [1, 1]),  # decode up to max_seq_len
]
HEADS = [(4, 4), (8, 2), (8, 1)]  # GQA group 1, 4, 8


def run_case(name: str, device: str, dtype: torch.dtype, heads: tuple[int, int], head_dim: int,
             block_size: int, ctx: list[int], new: list[int], tol: float,
             max_seq_len: int = 64, **options: Any) -> None:  # fmt: skip
    hq, hkv = heads
    spec = KVCacheSpec(num_layers=2, num_kv_heads=hkv, head_dim=head_dim, max_slots=6,
                       max_seq_len=max_seq_len, dtype=dtype)  # fmt: skip
    cache = PagedKVCache(spec, block_size, device=device)
    poison = 1e3 if name == "paged_flex" and device == "cpu" else float("nan")
    cache._k[:, 1:].fill_(poison)
    cache._v[:, 1:].fill_(poison)
    attn = create_backend(name, cache, hq, hkv, head_dim, **options)
    gen = torch.Generator().manual_seed(sum(ctx) + 7 * sum(new) + block_size)
    seq = [c + n for c, n in zip(ctx, new, strict=True)]
    keys, values = random_requests(seq, hkv, head_dim, torch.float32, "cpu", gen)
    slots = []
    for _ in seq:  # scatter the blocks: another slot takes some first and gives them back
        other = cache.alloc_slot()
        cache.ensure(other, block_size + 1)
        slots.append(cache.alloc_slot())
        cache.free_slot(other)
    layer = 1
    for s, c, k, v in zip(slots, ctx, keys, values, strict=True):
        if c:
            cache.ensure(s, c)
            meta = AttentionMetadata.build([s], [0], [c], device, cache.block_tables([s]),
                                           block_size)  # fmt: skip
            attn.write_kv(layer, k[:c].to(device, dtype), v[:c].to(device, dtype), meta)
    cache.step(dict(zip(slots, seq, strict=True)))
    meta = AttentionMetadata.build(slots, ctx, new, device, cache.block_tables(slots), block_size)
    q = torch.randn(sum(new), hq, head_dim, generator=gen)
    k_new = torch.cat([k[c:] for k, c in zip(keys, ctx, strict=True)])
    v_new = torch.cat([v[c:] for v, c in zip(values, ctx, strict=True)])
    out = attn.forward(layer, q.to(device, dtype), k_new.to(device, dtype),
                       v_new.to(device, dtype), meta)  # fmt: skip
    ref = reference_attention(
        q.double(), [k.double() for k in keys], [v.double() for v in values], new, attn.scale
    )
    assert out.shape == q.shape and out.dtype == dtype
    assert not torch.isnan(out).any()
    err = float((out.double().cpu() - ref).norm() / ref.norm())
    assert err < tol, err
    cache.check_integrity()


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("case", CASES)
def test_paged_torch_cpu(heads: tuple[int, int], block_size: int,
                         case: tuple[list[int], list[int]]) -> None:  # fmt: skip
    run_case("paged_torch", "cpu", torch.float32, heads, 16, block_size, *case, tol=1e-5)


@pytest.mark.parametrize(("heads", "block_size", "case"), [
    ((8, 2), 4, CASES[0]), ((4, 4), 16, CASES[1]), ((8, 1), 4, CASES[2]),
    ((8, 2), 16, CASES[3]), ((8, 2), 8, CASES[4]), ((8, 1), 16, CASES[5]),
])  # fmt: skip
def test_paged_triton_cpu_interpreter(heads: tuple[int, int], block_size: int,
                                      case: tuple[list[int], list[int]]) -> None:  # fmt: skip
    run_case("paged_triton", "cpu", torch.float32, heads, 16, block_size, *case, tol=1e-4)


def test_paged_triton_multi_partition_decode_cpu() -> None:
    """Small partitions force the split-K path with its log-sum-exp combine."""
    run_case("paged_triton", "cpu", torch.float32, (8, 2), 16, 4, [40, 17, 63], [1, 1, 1],
             tol=1e-4, partition_size=16, decode_block_n=16)  # fmt: skip


@pytest.mark.parametrize(("heads", "block_size", "case"), [
    ((8, 2), 4, CASES[1]), ((8, 1), 16, CASES[2]), ((4, 4), 8, CASES[3]), ((8, 2), 16, CASES[0]),
])  # fmt: skip
def test_paged_flex_cpu(heads: tuple[int, int], block_size: int,
                        case: tuple[list[int], list[int]]) -> None:  # fmt: skip
    run_case("paged_flex", "cpu", torch.float32, heads, 16, block_size, *case, tol=1e-5,
             q_block=16)  # fmt: skip


GPU_CASES = CASES + [
    ([3000, 1200, 17, 4095], [1, 1, 1, 1]),  # long decode: several partitions
    ([1500, 0], [700, 1000]),  # chunk over a long context + a fresh prompt
]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["paged_torch", "paged_triton"])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("heads", [(32, 8), (32, 4)])
@pytest.mark.parametrize("case", GPU_CASES)
def test_paged_backends_gpu(name: str, block_size: int, heads: tuple[int, int],
                            case: tuple[list[int], list[int]]) -> None:  # fmt: skip
    run_case(name, "cuda", torch.bfloat16, heads, 128, block_size, *case, tol=2e-2,
             max_seq_len=4096)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("case", [GPU_CASES[i] for i in (1, 3, 6, 7)])
def test_paged_flex_gpu(block_size: int, case: tuple[list[int], list[int]]) -> None:
    """Fewer cases than the Triton backend: every new shape costs flex a compilation."""
    run_case("paged_flex", "cuda", torch.bfloat16, (32, 8), 128, block_size, *case, tol=2e-2,
             max_seq_len=4096)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_paged_triton_gpu_fp16_gqa1(case: tuple[list[int], list[int]]) -> None:
    run_case("paged_triton", "cuda", torch.float16, (8, 8), 128, 16, *case, tol=2e-2,
             max_seq_len=4096)  # fmt: skip
