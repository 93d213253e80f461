"""Cascade decoding (`decode_attention(..., prefix=SharedPrefix(...))`): requests that share a
prefix have it attended once, read from the leader's copy, and merged with their own tokens.

The sharers' own copies of the prefix are left NaN (the reference cache starts NaN-filled), so
any read of them, instead of the leader's, poisons the output. CPU tests run under the Triton
interpreter with tiny shapes; `gpu` tests use realistic ones and a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from reference import DenseKVCache, random_requests, reference_attention

from vattention.attention.decode_kernels import (
    _counters,
    decode_attention,
    prefix_partition_size,
)
from vattention.attention.shared_prefix import SharedPrefix


def shared_case(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    rows: list[tuple[int, int, bool]],
    prefix_len: int,
    num_heads: int,
    leader: int,
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """`rows`: (slot, seq_len, shares the prefix). The leader's slot gets the prefix; a
    sharer gets only its own tokens after it (its prefix rows stay NaN); the others get all
    their tokens. Returns (q, keys, values) with each request's full K/V for the reference."""
    dtype, device = cache_k.dtype, cache_k.device
    hkv, dim = cache_k.shape[2], cache_k.shape[3]
    gen = torch.Generator().manual_seed(seed)
    pk, pv = random_requests([prefix_len], hkv, dim, dtype, device, gen)
    cache_k[leader, :prefix_len], cache_v[leader, :prefix_len] = pk[0], pv[0]
    keys, values = [], []
    for slot, n, shares in rows:
        own = n - prefix_len if shares else n
        k, v = random_requests([own], hkv, dim, dtype, device, gen)
        at = prefix_len if shares else 0
        cache_k[slot, at:n], cache_v[slot, at:n] = k[0], v[0]
        keys.append(torch.cat([pk[0], k[0]]) if shares else k[0])
        values.append(torch.cat([pv[0], v[0]]) if shares else v[0])
    q = torch.randn(len(rows), num_heads, dim, generator=gen).to(device, dtype)
    return q, keys, values


def prefix_of(lens: list[int], length: int, leader: int, max_length: int, size: int | None,
              device: str = "cpu") -> SharedPrefix:  # fmt: skip
    i32 = {"dtype": torch.int32, "device": device}
    return SharedPrefix(torch.tensor(lens, **i32), torch.tensor([length], **i32),
                        torch.tensor([leader], **i32), max_length, size)  # fmt: skip


@pytest.mark.parametrize(("group", "suffix_part", "prefix_part"), [
    (4, 16, 16), (1, 16, 32), (3, 64, 16), (4, 64, None),
])  # fmt: skip
def test_sharers_read_the_leaders_prefix_once(
    group: int, suffix_part: int, prefix_part: int | None
) -> None:
    """Sharers (whose own prefix rows are NaN), a request that does not share, and a padding
    row: each equals the float64 reference over its full context, with one or several
    partitions on both sides of the merge; the counters are left at 0."""
    cache = DenseKVCache(1, 6, 96, 2, 16, torch.float32, "cpu", "per_layer")
    prefix_len = 40  # not a multiple of the 16-row tiles
    rows = [(0, 57, True), (2, 41, True), (3, 90, False), (5, 96, True)]
    q, keys, values = shared_case(cache.k_cache(0), cache.v_cache(0), rows, prefix_len,
                                  2 * group, leader=0)  # fmt: skip
    expected = reference_attention(q, keys, values, [1] * len(rows), 16**-0.5)
    q = torch.cat([q, q[:1]])  # + a padding row: length 0
    slots = torch.tensor([r[0] for r in rows] + [1], dtype=torch.int32)
    seq_lens = torch.tensor([r[1] for r in rows] + [0], dtype=torch.int32)
    lens = [prefix_len if r[2] else 0 for r in rows] + [0]
    for _ in range(2):  # the second call finds the counters the first one left
        out = decode_attention(
            q, cache.k_cache(0), cache.v_cache(0), slots, seq_lens, 16**-0.5, 96,
            block_n=16, partition_size=suffix_part,
            prefix=prefix_of(lens, prefix_len, 0, 64, prefix_part),
        )  # fmt: skip
        torch.testing.assert_close(out[:-1].double(), expected, atol=2e-5, rtol=0)
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        assert not _counters(q.device, len(rows) * 2 + 2).any()


def test_no_prefix_this_step_is_plain_decoding() -> None:
    """A graph captured for cascade replays a step with no shared prefix (length 0, every row
    0): the prefix programs do nothing and each request reads its own tokens."""
    cache = DenseKVCache(1, 3, 64, 2, 16, torch.float32, "cpu", "per_layer")
    gen = torch.Generator().manual_seed(1)
    lens = [33, 64, 5]
    keys, values = random_requests(lens, 2, 16, torch.float32, "cpu", gen)
    for s, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.k_cache(0)[s, : k.shape[0]], cache.v_cache(0)[s, : v.shape[0]] = k, v
    q = torch.randn(3, 8, 16, generator=gen)
    slots = torch.arange(3, dtype=torch.int32)
    out = decode_attention(
        q, cache.k_cache(0), cache.v_cache(0), slots, torch.tensor(lens, dtype=torch.int32),
        0.25, 64, block_n=16, partition_size=16, prefix=prefix_of([0, 0, 0], 0, 0, 48, 16),
    )  # fmt: skip
    expected = reference_attention(q, keys, values, [1, 1, 1], 0.25)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)


def test_paged_sharers_read_the_leaders_blocks() -> None:
    """Block-table mode: the leader's table row is read for the prefix; the sharers' tables
    point their prefix blocks at a NaN block, which must never be read."""
    bs, hkv, dim, prefix_len = 8, 2, 16, 24
    pool_k = torch.full((20, bs, hkv, dim), float("nan"))
    pool_v = torch.full((20, bs, hkv, dim), float("nan"))
    gen = torch.Generator().manual_seed(2)
    lens = [30, 45, 25]
    keys, values = random_requests(lens, hkv, dim, torch.float32, "cpu", gen)
    for i in range(1, 3):  # the sharers' full K/V are the leader's prefix + their own
        keys[i][:prefix_len], values[i][:prefix_len] = keys[0][:prefix_len], values[0][:prefix_len]
    tables = torch.zeros(3, 8, dtype=torch.int32)  # block 0 is all NaN
    next_block = 1
    for i, n in enumerate(lens):
        for j in range(-(-n // bs)):
            if i > 0 and (j + 1) * bs <= prefix_len:
                continue  # a sharer's prefix block: left pointing at the NaN block
            tables[i, j] = next_block
            a, z = j * bs, min(n, (j + 1) * bs)
            pool_k[next_block, : z - a], pool_v[next_block, : z - a] = keys[i][a:z], values[i][a:z]
            next_block += 1
    q = torch.randn(3, 8, dim, generator=gen)
    seq = torch.tensor(lens, dtype=torch.int32)
    out = decode_attention(
        q, pool_k, pool_v, seq, seq, 0.25, 48, block_n=16, block_tables=tables,
        partition_size=16, prefix=prefix_of([prefix_len] * 3, prefix_len, 0, 32, 16),
    )  # fmt: skip
    expected = reference_attention(q, keys, values, [1, 1, 1], 0.25)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)


def test_prefix_partitions_fill_the_gpu_within_bounds() -> None:
    # 64 requests x 4 heads = 4 row tiles x 8 KV heads = 32 tiles: 9 partitions for 2 per SM
    assert prefix_partition_size(64, 4, 8, 4096, 64, 132) == 512
    for batch, max_length in [(1, 65536), (256, 4096), (8, 100)]:
        size = prefix_partition_size(batch, 4, 8, max_length, 64, 132)
        assert size % 64 == 0 and size >= 256 and -(-max_length // size) <= 64


@pytest.mark.gpu
def test_gpu_cascade_in_a_cuda_graph_matches_plain_decoding() -> None:
    """bf16, 64 requests of which 48 share a 4K-token prefix (copied into every sharer's slot,
    so plain decoding over each slot is the reference), replayed from a CUDA graph with the
    prefix length changed between replays (0 included)."""
    batch, max_len, hkv, group = 64, 6144, 8, 4
    cache = DenseKVCache(1, batch, max_len, hkv, 128, torch.bfloat16, "cuda", "cross_layer")
    gen = torch.Generator().manual_seed(5)
    k, v = cache.k_cache(0), cache.v_cache(0)
    k.copy_(torch.randn(k.shape, generator=gen).to(k))
    v.copy_(torch.randn(v.shape, generator=gen).to(v))
    sharers = torch.arange(batch) % 4 != 3
    k[sharers, :4096] = k[0, :4096]
    v[sharers, :4096] = v[0, :4096]
    seq_lens = torch.randint(4097, max_len + 1, (batch,), generator=gen, dtype=torch.int32)
    q = torch.randn(batch, hkv * group, 128, generator=gen).to("cuda", torch.bfloat16)
    slots = torch.arange(batch, dtype=torch.int32, device="cuda")
    seq = seq_lens.cuda()
    prefix = prefix_of([0] * batch, 0, 0, 4096, None, "cuda")

    def run() -> torch.Tensor:
        return decode_attention(q, k, v, slots, seq, 128**-0.5, max_len, prefix=prefix)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for length in (4096, 1000, 0):
        lens = torch.where(sharers, length, 0).to(torch.int32)
        prefix.lens.copy_(lens)
        prefix.length.fill_(length)
        graph.replay()
        plain = decode_attention(q, k, v, slots, seq, 128**-0.5, max_len)
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), plain.float(), atol=2e-2, rtol=0)


def test_long_graph_contexts_leave_room_for_the_prefix_partials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grid sized for a long max_seq_len (a long-context graph) on an H200-sized GPU, whose
    default partitions alone would take all 128 partials, still fits the prefix's (64 + 64)
    and answers right."""
    from vattention.attention import decode_kernels

    monkeypatch.setattr(decode_kernels, "num_sms", lambda device: 132)
    assert decode_kernels.default_partition_size(3, 1, 131072, 16, 132) * 128 <= 131072
    cache = DenseKVCache(1, 3, 64, 1, 16, torch.float32, "cpu", "per_layer")
    rows = [(0, 40, True), (1, 50, True), (2, 20, False)]
    q, keys, values = shared_case(cache.k_cache(0), cache.v_cache(0), rows, 32, 4, leader=0)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32)
    seq = torch.tensor([40, 50, 20], dtype=torch.int32)
    out = decode_attention(
        q, cache.k_cache(0), cache.v_cache(0), slots, seq, 0.25, 131072, block_n=16,
        prefix=prefix_of([32, 32, 0], 32, 0, 131072, None),
    )  # fmt: skip
    expected = reference_attention(q, keys, values, [1, 1, 1], 0.25)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
