"""Paged kernels and backend plumbing: launch heuristics, CUDA-graph-shaped metadata, strided
pools, clear errors, and (on the GPU) 64-bit offsets and long uneven batches."""

from __future__ import annotations

import pytest
import torch
from reference import DenseKVCache, random_requests, reference_attention

from vattention.attention import AttentionMetadata, create_backend
from vattention.attention.decode_kernels import default_partition_size
from vattention.attention.prefill_kernels import prefill_tiles
from vattention.kvcache.paged import PagedKVCache
from vattention.kvcache.spec import KVCacheSpec


class StridedPools:
    """Paged pools of all layers interleaved per block: `[blocks, layers, bs, H, D][:, layer]`."""

    def __init__(self, layers: int, blocks: int, bs: int, heads: int, dim: int) -> None:
        self.k = torch.full((blocks, layers, bs, heads, dim), float("nan"))
        self.v = torch.full((blocks, layers, bs, heads, dim), float("nan"))

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.k[:, layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.v[:, layer]


def test_partition_size_heuristic() -> None:
    for batch, heads, max_len in [(1, 8, 65536), (256, 8, 1024), (64, 4, 16384), (1, 1, 1)]:
        size = default_partition_size(batch, heads, max_len, 64, 132)
        assert size % 64 == 0 and size >= 256
        assert -(-max_len // size) <= 128
    # A small batch splits a long context finely; a large batch keeps it whole.
    assert default_partition_size(1, 8, 65536, 64, 132) < default_partition_size(256, 8, 65536, 64, 132)  # fmt: skip
    # 32 programs x 132 SMs / (256 x 8) programs per partition -> 3 partitions
    assert default_partition_size(256, 8, 4096, 64, 132) == 1408


def test_prefill_tiles_cover_every_query_longest_first() -> None:
    q_lens, s_lens = [1, 40, 5, 17], [9, 40, 105, 17]
    req, row = prefill_tiles([1, 2, 3], q_lens, s_lens, 16)
    assert sorted(zip(req, row, strict=True)) == [
        (1, 0), (1, 16), (1, 32), (2, 0), (3, 0), (3, 16)
    ]  # fmt: skip
    ends = [s_lens[i] - q_lens[i] + min(r + 16, q_lens[i]) for i, r in zip(req, row, strict=True)]
    assert ends == sorted(ends, reverse=True)


def _graph_style_decode(
    name: str, device: str, dtype: torch.dtype, hd: int, tol: float, bs: int = 4
) -> None:
    """Decode metadata shaped like the engine's CUDA graphs: tables padded to the model's full
    width with a real block, host lengths set to max_model_len, padding rows of length 1."""
    hq, hkv, max_len = 8, 2, 64
    spec = KVCacheSpec(num_layers=1, num_kv_heads=hkv, head_dim=hd, max_slots=4,
                       max_seq_len=max_len, dtype=dtype)  # fmt: skip
    cache = PagedKVCache(spec, bs, device=device)
    cache._k[:, 1:].fill_(float("nan"))
    cache._v[:, 1:].fill_(float("nan"))
    attn = create_backend(name, cache, hq, hkv, hd)
    gen = torch.Generator().manual_seed(3)
    lens = [9, 30]
    keys, values = random_requests(lens, hkv, hd, torch.float32, "cpu", gen)
    dummy = cache.alloc_slot()
    cache.ensure(dummy, 1)
    slots = [cache.alloc_slot() for _ in lens]
    cache.step(dict(zip(slots, lens, strict=True)))
    for s, n, k, v in zip(slots, lens, keys, values, strict=True):
        meta = AttentionMetadata.build([s], [0], [n], device, cache.block_tables([s]), bs)
        attn.write_kv(0, k.to(device, dtype), v.to(device, dtype), meta)
    cache.k_cache(0)[cache.block_table(dummy)[0], 0] = 0.0
    cache.v_cache(0)[cache.block_table(dummy)[0], 0] = 0.0
    width, fill = max_len // bs, cache.block_table(dummy)[0]
    rows = [cache.block_table(s) for s in slots] + [[fill]]
    tables = torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.int32)
    meta = AttentionMetadata.build(slots + [dummy], [n - 1 for n in lens] + [0], [1, 1, 1], device)
    meta.block_tables, meta.block_size = tables.to(device), bs
    meta.max_seq_len, meta.seq_lens_host = max_len, [max_len] * 3
    q = torch.randn(3, hq, hd, generator=gen)
    out = attn.attend(0, q.to(device, dtype), meta)
    ref = reference_attention(q[:2].double(), [k.double() for k in keys],
                              [v.double() for v in values], [1, 1], attn.scale)  # fmt: skip
    err = float((out[:2].double().cpu() - ref).norm() / ref.norm())
    assert err < tol and not torch.isnan(out).any()


def test_cuda_graph_shaped_decode_cpu() -> None:
    """(`paged_torch` follows the host lengths: the engine uses it without graphs.)"""
    _graph_style_decode("paged_triton", "cpu", torch.float32, 16, 1e-4)


@pytest.mark.parametrize("name", ["paged_torch", "paged_triton"])
def test_strided_pools_cpu(name: str) -> None:
    """Pools that are strided views (not contiguous) are written and read correctly."""
    pools = StridedPools(layers=2, blocks=12, bs=4, heads=2, dim=16)
    attn = create_backend(name, pools, 8, 2, 16)
    gen = torch.Generator().manual_seed(5)
    (k,), (v,) = random_requests([13], 2, 16, torch.float32, "cpu", gen)
    table = [[7, 2, 9, 4]]
    meta = AttentionMetadata.build([0], [0], [10], "cpu", table, 4)
    attn.write_kv(1, k[:10], v[:10], meta)
    meta = AttentionMetadata.build([0], [10], [3], "cpu", table, 4)
    q = torch.randn(3, 8, 16, generator=gen)
    out = attn.forward(1, q, k[10:], v[10:], meta)
    ref = reference_attention(q.double(), [k.double()], [v.double()], [3], attn.scale)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-4
    with pytest.raises(ValueError, match="end to end"):
        create_backend("paged_flex", pools, 8, 2, 16)


@pytest.mark.parametrize("name", ["paged_torch", "paged_triton", "paged_flex"])
def test_bad_input_is_rejected_clearly(name: str) -> None:
    spec = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, max_slots=2, max_seq_len=32,
                       dtype=torch.float32)  # fmt: skip
    cache = PagedKVCache(spec, 8)
    with pytest.raises(ValueError, match="paged cache"):
        create_backend(name, DenseKVCache(1, 2, 32, 4, 16), 8, 2, 16)
    with pytest.raises(ValueError, match="paged cache"):
        create_backend(name, cache, 8, 4, 16)
    attn = create_backend(name, cache, 8, 2, 16)
    s = cache.alloc_slot()
    cache.ensure(s, 4)
    q, kv = torch.zeros(4, 8, 16), torch.zeros(4, 2, 16)
    dense = AttentionMetadata.build([s], [0], [4])
    with pytest.raises(ValueError, match="block_tables"):
        attn.forward(0, q, kv, kv, dense)
    with pytest.raises(ValueError, match="block_size=8"):
        attn.attend(0, q, AttentionMetadata.build([s], [0], [4], "cpu", [[1]], 4))
    meta = AttentionMetadata.build([s], [0], [4], "cpu", cache.block_tables([s]), 8)
    with pytest.raises(TypeError, match="dtype"):
        attn.attend(0, q.half(), meta)
    with pytest.raises(ValueError, match="q must be"):
        attn.attend(0, q[:3], meta)
    with pytest.raises(ValueError, match="k and v must be"):
        attn.write_kv(0, kv[:2], kv, meta)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["paged_triton", "paged_flex"])
def test_cuda_graph_shaped_decode_gpu(name: str) -> None:
    """(Compiled flex needs pages of 16+ tokens: its KV tile is one page.)"""
    _graph_style_decode(name, "cuda", torch.bfloat16, 128, 2e-2, 16 if name == "paged_flex" else 4)


@pytest.mark.gpu
def test_paged_flex_small_blocks_rejected_on_gpu() -> None:
    spec = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=64, max_slots=2, max_seq_len=32,
                       dtype=torch.bfloat16)  # fmt: skip
    with pytest.raises(ValueError, match="block_size >= 16"):
        create_backend("paged_flex", PagedKVCache(spec, 8, device="cuda"), 8, 2, 64)


@pytest.mark.gpu
def test_decode_past_2_to_31_elements_gpu() -> None:
    """Blocks beyond element offset 2^31 of a pool are addressed right (64-bit offsets)."""
    bs, hkv, hd = 16, 8, 128
    num_blocks = (1 << 31) // (bs * hkv * hd) + 64
    spec = KVCacheSpec(num_layers=1, num_kv_heads=hkv, head_dim=hd, max_slots=1,
                       max_seq_len=1000, dtype=torch.bfloat16)  # fmt: skip
    cache = PagedKVCache(spec, bs, num_blocks=num_blocks, device="cuda")
    attn = create_backend("paged_triton", cache, 32, hkv, hd)
    gen = torch.Generator().manual_seed(1)
    (k,), (v,) = random_requests([1000], hkv, hd, torch.float32, "cpu", gen)
    table = list(range(num_blocks - 63, num_blocks))  # the last 63 blocks
    meta = AttentionMetadata.build([0], [0], [1000], "cuda", [table], bs)
    attn.write_kv(0, k.cuda().bfloat16(), v.cuda().bfloat16(), meta)
    q = torch.randn(1, 32, hd, generator=gen)
    meta = AttentionMetadata.build([0], [999], [1], "cuda", [table], bs)
    out = attn.attend(0, q.cuda().bfloat16(), meta)
    ref = reference_attention(q.double(), [k.double()], [v.double()], [1], attn.scale)
    assert float((out.double().cpu() - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 128])
def test_long_uneven_decode_matches_paged_torch_gpu(block_size: int) -> None:
    lens = [8192, 4100, 1, 6000, 777, 8000, 5000, 129]
    spec = KVCacheSpec(num_layers=1, num_kv_heads=8, head_dim=128, max_slots=len(lens),
                       max_seq_len=8192, dtype=torch.bfloat16)  # fmt: skip
    cache = PagedKVCache(spec, block_size, device="cuda")
    cache._k.normal_()
    cache._v.normal_()
    slots = [cache.alloc_slot() for _ in lens]
    cache.step(dict(zip(slots, lens, strict=True)))
    meta = AttentionMetadata.build(slots, [n - 1 for n in lens], [1] * len(lens), "cuda",
                                   cache.block_tables(slots), block_size)  # fmt: skip
    q = torch.randn(len(lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    want = create_backend("paged_torch", cache, 32, 8, 128).attend(0, q, meta).float()
    for name in ("paged_triton", "paged_flex"):
        got = create_backend(name, cache, 32, 8, 128).attend(0, q, meta).float()
        assert float((got - want).norm() / want.norm()) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["paged_triton", "paged_flex"])
def test_cuda_graph_replays_follow_new_lengths_and_tables_gpu(name: str) -> None:
    """Decode captured once in a CUDA graph (as the engine does), replayed after the lengths
    and block tables changed in place, matches an eager `paged_torch` on the new step."""
    bs, hq, hkv, hd, max_len, batch = 16, 32, 8, 128, 2048, 4
    spec = KVCacheSpec(num_layers=1, num_kv_heads=hkv, head_dim=hd, max_slots=batch + 1,
                       max_seq_len=max_len, dtype=torch.bfloat16)  # fmt: skip
    cache = PagedKVCache(spec, bs, device="cuda")
    cache._k.normal_()
    cache._v.normal_()
    dummy = cache.alloc_slot()
    cache.ensure(dummy, 1)
    slots = [cache.alloc_slot() for _ in range(batch)]
    width, fill = max_len // bs, cache.block_table(dummy)[0]
    seq_buf = torch.ones(batch, dtype=torch.int32, device="cuda")
    table_buf = torch.full((batch, width), fill, dtype=torch.int32, device="cuda")
    q_buf = torch.zeros(batch, hq, hd, dtype=torch.bfloat16, device="cuda")
    meta = AttentionMetadata(
        slots=torch.tensor(slots, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        seq_lens=seq_buf, context_lens=seq_buf - 1,
        token_slots=torch.tensor(slots, device="cuda"), token_positions=seq_buf.long() - 1,
        max_query_len=1, max_seq_len=max_len, slots_host=slots, query_lens_host=[1] * batch,
        seq_lens_host=[max_len] * batch, block_tables=table_buf, block_size=bs,
    )  # fmt: skip
    attn = create_backend(name, cache, hq, hkv, hd)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            attn.attend(0, q_buf, meta)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.attend(0, q_buf, meta)
    ref_attn = create_backend("paged_torch", cache, hq, hkv, hd)
    for lens in ([100, 17, 1500, 32], [101, 18, 1501, 33], [700, 2048, 5, 999]):
        cache.step(dict(zip(slots, lens, strict=True)))
        tables = [t + [fill] * (width - len(t)) for t in cache.block_tables(slots)]
        seq_buf.copy_(torch.tensor(lens, dtype=torch.int32))
        table_buf.copy_(torch.tensor(tables, dtype=torch.int32))
        q_buf.normal_()
        graph.replay()
        want_meta = AttentionMetadata.build(slots, [n - 1 for n in lens], [1] * batch, "cuda",
                                            cache.block_tables(slots), bs)  # fmt: skip
        want = ref_attn.attend(0, q_buf, want_meta).float()
        assert float((out.float() - want).norm() / want.norm()) < 1e-2, lens
