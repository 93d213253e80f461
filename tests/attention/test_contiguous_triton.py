"""The Triton split-K decode kernel: partitions, launch knobs, heuristics, 64-bit offsets.

CPU tests run under the Triton interpreter with tiny shapes; `gpu` tests use realistic ones.
"""

from __future__ import annotations

import pytest
import torch
from reference import DenseKVCache, random_requests, reference_attention

from vattention.attention.decode_kernels import (
    decode_attention,
    default_partition_size,
    splits_to_partition_size,
)


def decode_case(
    cache: DenseKVCache,
    slots: list[int],
    seq_lens: list[int],
    num_heads: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill the slots with random K/V; return (q, slots, seq_lens as device tensors, reference)."""
    k_cache = cache.k_cache(0)
    dtype, device = k_cache.dtype, k_cache.device
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    gen = torch.Generator().manual_seed(seed)
    keys, values = random_requests(seq_lens, num_kv_heads, head_dim, dtype, device, gen)
    for slot, k, v in zip(slots, keys, values, strict=True):
        cache.k_cache(0)[slot, : k.shape[0]] = k
        cache.v_cache(0)[slot, : v.shape[0]] = v
    q = torch.randn(len(slots), num_heads, head_dim, generator=gen).to(device, dtype)
    expected = reference_attention(q, keys, values, [1] * len(slots), head_dim**-0.5)
    s = torch.tensor(slots, dtype=torch.int32, device=device)
    n = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, s, n, expected


@pytest.mark.parametrize(("num_splits", "layout"), [
    (1, "per_layer"), (2, "per_layer"), (7, "per_layer"), (3, "cross_layer"), (3, "padded"),
])  # fmt: skip
def test_any_split_count_gives_the_same_answer(num_splits: int, layout: str) -> None:
    """Short requests leave most splits empty; long ones use all; results must not change."""
    cache = DenseKVCache(1, 4, 80, 2, 16, torch.float32, "cpu", layout)
    slots, seq_lens = [2, 0, 3], [1, 37, 80]
    q, s, n, expected = decode_case(cache, slots, seq_lens, num_heads=8)
    out = decode_attention(
        q, cache.k_cache(0), cache.v_cache(0), s, n, 16**-0.5, 80, num_splits=num_splits, block_n=16
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("group", [1, 3, 4, 32])
def test_group_sizes_including_non_powers_of_two(group: int) -> None:
    cache = DenseKVCache(1, 2, 40, 1, 16, torch.float32, "cpu", "per_layer")
    q, s, n, expected = decode_case(cache, [1, 0], [40, 17], num_heads=group)
    out = decode_attention(q, cache.k_cache(0), cache.v_cache(0), s, n, 16**-0.5, 40, block_n=16)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)


def test_partitions_fill_the_gpu_and_respect_the_context() -> None:
    # B=64 x 8 kv heads = 512 programs per partition: 9 partitions reach 32 programs per SM.
    assert default_partition_size(64, 8, 65536, 64, 132) == -(-65536 // 9 // 64) * 64
    # Short contexts are never cut below 256 tokens; a large batch keeps a context whole.
    assert default_partition_size(1, 1, 100, 64, 132) == 256
    assert default_partition_size(256, 8, 256, 64, 132) == 256
    # `num_splits` becomes the partition size that cuts the longest context that many times.
    assert splits_to_partition_size(80, 3, 16) == 32
    assert splits_to_partition_size(1, 7, 16) == 16
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        splits_to_partition_size(80, 0, 16)


def test_graph_sized_grid_over_short_requests() -> None:
    """The grid follows the host's max_seq_len (a CUDA graph's max_model_len): partitions past a
    request's length exit, and the answer does not change."""
    cache = DenseKVCache(1, 3, 256, 2, 16, torch.float32, "cpu", "per_layer")
    q, s, n, expected = decode_case(cache, [0, 1, 2], [5, 40, 17], num_heads=4)
    out = decode_attention(
        q, cache.k_cache(0), cache.v_cache(0), s, n, 16**-0.5, 256, partition_size=16, block_n=16
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_attention(q, cache.k_cache(0), cache.v_cache(0), s, n, 1.0, 256, partition_size=24,
                         block_n=16)  # fmt: skip
    with pytest.raises(ValueError, match="at most 128"):
        decode_attention(q, cache.k_cache(0), cache.v_cache(0), s, n, 1.0, 4096, partition_size=16,
                         block_n=16)  # fmt: skip


def test_rejects_bad_shapes() -> None:
    cache = DenseKVCache(1, 2, 16, 1, 16, torch.float32, "cpu", "per_layer")
    q = torch.zeros(1, 4, 16)
    i = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous last"):
        decode_attention(q, cache.k_cache(0).transpose(2, 3), cache.v_cache(0), i, i + 1, 1.0, 1)
    odd = DenseKVCache(1, 2, 16, 1, 12, torch.float32, "cpu", "per_layer")
    with pytest.raises(ValueError, match="power-of-two"):
        decode_attention(torch.zeros(1, 4, 12), odd.k_cache(0), odd.v_cache(0), i, i + 1, 1.0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "num_kv_heads", "group", "max_len"), [
    (64, 8, 4, 8192), (1, 8, 4, 32768), (3, 2, 8, 20000), (128, 1, 1, 700),
])  # fmt: skip
def test_gpu_realistic_shapes(
    dtype: torch.dtype, batch: int, num_kv_heads: int, group: int, max_len: int
) -> None:
    cache = DenseKVCache(1, batch, max_len, num_kv_heads, 128, dtype, "cuda", "cross_layer")
    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    seq_lens[0] = max_len
    slots = torch.randperm(batch, generator=gen).tolist()
    q, s, n, expected = decode_case(cache, slots, seq_lens, num_kv_heads * group)
    out = decode_attention(q, cache.k_cache(0), cache.v_cache(0), s, n, 128**-0.5, max_len)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)


@pytest.mark.gpu
def test_gpu_offsets_past_two_to_the_31_elements() -> None:
    """A slot that starts beyond 2^31 elements of the base (a large virtual cache) is read right."""
    slot_stride = 2**30 + 1024
    size = 2 * slot_stride + 256 * 1024
    views = [
        torch.full((size,), float("nan"), dtype=torch.bfloat16, device="cuda").as_strided(
            (3, 256, 8, 128), (slot_stride, 1024, 128, 1)
        )
        for _ in range(2)
    ]

    class Cache(DenseKVCache):
        def __init__(self) -> None:
            self._k, self._v = [views[0]], [views[1]]

    q, s, n, expected = decode_case(Cache(), [2], [256], num_heads=32)
    out = decode_attention(q, views[0], views[1], s, n, 128**-0.5, 256, num_splits=4)
    torch.testing.assert_close(out.double(), expected, atol=4e-2, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_zero_length_rows_give_zeros_not_nan(num_splits: int) -> None:
    """CUDA-graph padding rows may carry seq_len 0: they must not produce NaN."""
    cache = DenseKVCache(1, 2, 32, 1, 16, torch.float32, "cpu", "per_layer")
    q, s, n, expected = decode_case(cache, [0], [20], num_heads=2)
    q2 = torch.cat([q, q])
    s2 = torch.tensor([0, 1], dtype=torch.int32)
    n2 = torch.tensor([20, 0], dtype=torch.int32)
    out = decode_attention(
        q2, cache.k_cache(0), cache.v_cache(0), s2, n2, 0.25, 32, num_splits=num_splits, block_n=16
    )
    torch.testing.assert_close(out[:1].double(), expected, atol=2e-5, rtol=0)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_merge_counters_are_left_at_zero_and_calls_repeat() -> None:
    """Requests over several partitions are merged by the program that counts last, which
    resets its counter: after any call every counter is 0, so the next call (another layer, a
    graph replay) merges right too. A one-partition request is written directly."""
    from vattention.attention.decode_kernels import _counters

    cache = DenseKVCache(1, 4, 96, 2, 16, torch.float32, "cpu", "per_layer")
    q, s, n, expected = decode_case(cache, [3, 1, 0, 2], [96, 16, 1, 50], num_heads=4)
    n[2] = 0
    for _ in range(3):
        out = decode_attention(
            q, cache.k_cache(0), cache.v_cache(0), s, n, 16**-0.5, 96, partition_size=16,
            block_n=16,
        )  # fmt: skip
        torch.testing.assert_close(out[[0, 1, 3]].double(), expected[[0, 1, 3]], atol=2e-5, rtol=0)
        assert torch.equal(out[2], torch.zeros_like(out[2]))  # a padding row
        assert not _counters(q.device, 4 * 2).any()


@pytest.mark.gpu
def test_gpu_merge_in_a_cuda_graph_matches_eager() -> None:
    """The in-launch merge replayed from a CUDA graph, with lengths changed between replays
    (one, several and every partition per request), matches eager calls and the reference."""
    cache = DenseKVCache(1, 16, 4096, 8, 128, torch.bfloat16, "cuda", "cross_layer")
    gen = torch.Generator().manual_seed(7)
    lens = [torch.randint(1, 4097, (16,), generator=gen).tolist() for _ in range(3)]
    lens[1] = [min(x, 200) for x in lens[1]]  # one partition each
    q, s, n, _ = decode_case(cache, list(range(16)), [4096] * 16, num_heads=32)
    static_n = n.clone()

    def run() -> torch.Tensor:
        return decode_attention(q, cache.k_cache(0), cache.v_cache(0), s, static_n,
                                128**-0.5, 4096, partition_size=256)  # fmt: skip

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seq_lens in lens:
        static_n.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        graph.replay()
        eager = run()
        torch.cuda.synchronize()
        keys = [cache.k_cache(0)[i, :m] for i, m in enumerate(seq_lens)]
        values = [cache.v_cache(0)[i, :m] for i, m in enumerate(seq_lens)]
        expected = reference_attention(q, keys, values, [1] * 16, 128**-0.5)
        torch.testing.assert_close(out.double(), expected, atol=4e-2, rtol=0)
        torch.testing.assert_close(out, eager, atol=0, rtol=0)


def test_counter_buffers_grow_and_stay_allocated() -> None:
    """A larger call gets a larger counter buffer; the smaller one stays allocated (a CUDA graph
    captured with it keeps writing there), and later calls share the newest."""
    from vattention.attention.decode_kernels import _COUNTERS, _counters

    device = torch.device("cpu")
    small = _counters(device, 8)
    big = _counters(device, small.numel() + 1)
    assert big.numel() > small.numel() and not big.any()
    assert any(b is small for b in _COUNTERS[device]) and _COUNTERS[device][-1] is big
    assert _counters(device, 8) is big
