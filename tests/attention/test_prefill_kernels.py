"""The shared Triton causal prefill kernel (`prefill_kernels`) in both modes.

Contiguous mode reads `cache[slot, pos]` by strides: a real `VirtualKVCache` (CPU backend, 4 KiB
pages, so requests cross and end inside pages; reading an unmapped page would crash) in both
layouts, and NaN-filled dense caches with padded slot strides. Paged mode reads through
scattered block tables over NaN-filled pools. Batches mix fresh prompts, continued chunks and
1-token rows; the answer is the float64 reference. Sentinel tiles (-1) must do nothing.
CPU tests run under the Triton interpreter (tests/conftest.py) with tiny shapes; `gpu` tests
use realistic ones, and one replays the launch as a CUDA graph with refilled buffers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import DenseKVCache, random_requests, reference_attention

from vattention.attention.prefill_kernels import (
    default_prefill_config,
    max_tiles,
    pad_tiles,
    prefill_attention,
    prefill_tiles,
)
from vattention.kvcache.spec import KVCacheSpec
from vattention.kvcache.virtual import VirtualKVCache

# (context lengths, new tokens): fresh prompts, continued chunks (some over several tiles and
# key blocks), decode rows, a fresh 1-token prompt.
MIXED = ([0, 37, 20, 0, 50, 3], [23, 12, 1, 1, 30, 17])
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass(repr=False)
class Case:
    """One launch's inputs and the float64 reference of every query row. (No dataclass repr:
    printing a whole virtual-cache view touches unbacked rows, and a test report would crash.)"""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slots: torch.Tensor | None
    block_tables: torch.Tensor | None
    query_lens: list[int]
    seq_lens_host: list[int]
    expected: torch.Tensor
    scale: float

    def __repr__(self) -> str:
        return f"Case(query_lens={self.query_lens}, seq_lens={self.seq_lens_host})"

    def run(self, req: list[int], row: list[int], out: torch.Tensor | None = None,
            block_m: int = 16, block_n: int = 16) -> torch.Tensor:  # fmt: skip
        dev = self.q.device
        out = torch.full_like(self.q, float("nan")) if out is None else out
        return prefill_attention(
            self.q, self.k_cache, self.v_cache, self.query_start_loc, self.seq_lens,
            torch.tensor(req, dtype=torch.int32, device=dev),
            torch.tensor(row, dtype=torch.int32, device=dev), self.scale, out,
            slots=self.slots, block_tables=self.block_tables,
            block_m=block_m, block_n=block_n, num_warps=4, num_stages=1,
        )  # fmt: skip

    def tiles(self, block_m: int = 16, requests: list[int] | None = None) -> tuple[list[int], ...]:
        reqs = range(len(self.query_lens)) if requests is None else requests
        return prefill_tiles(list(reqs), self.query_lens, self.seq_lens_host, block_m)


def _requests(ctx: list[int], new: list[int], heads: tuple[int, int], hd: int, seed: int):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    seq = [c + n for c, n in zip(ctx, new, strict=True)]
    keys, values = random_requests(seq, heads[1], hd, torch.float32, "cpu", gen)
    q = torch.randn(sum(new), heads[0], hd, generator=gen)
    return seq, keys, values, q


def contiguous_case(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: list[int],
                    ctx: list[int], new: list[int], num_heads: int, seed: int = 0) -> Case:  # fmt: skip
    """Write random K/V of every request into `cache[slot, :seq_len]` (in place)."""
    dev, dtype, hkv, hd = k_cache.device, k_cache.dtype, k_cache.shape[2], k_cache.shape[3]
    seq, keys, values, q = _requests(ctx, new, (num_heads, hkv), hd, seed)
    keys = [k.to(dtype) for k in keys]
    values = [v.to(dtype) for v in values]
    for s, n, k, v in zip(slots, seq, keys, values, strict=True):
        k_cache[s, :n] = k.to(dev)
        v_cache[s, :n] = v.to(dev)
    q = q.to(dtype)
    return _case(q.to(dev), k_cache, v_cache, new, seq, keys, values, slots=slots)


def paged_case(ctx: list[int], new: list[int], heads: tuple[int, int], hd: int, block_size: int,
               dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
               strided: bool = False) -> Case:  # fmt: skip
    """NaN-filled pools, every request's blocks scattered at random (block 0 pads the tables)."""
    seq, keys, values, q = _requests(ctx, new, heads, hd, seed)
    keys = [k.to(dtype) for k in keys]
    values = [v.to(dtype) for v in values]
    need = [-(-n // block_size) for n in seq]
    num_blocks = 1 + sum(need) + 3
    shape = (num_blocks, 2, block_size, heads[1], hd) if strided else (num_blocks, block_size, heads[1], hd)  # fmt: skip
    pools = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(2)]
    k_pool, v_pool = (p[:, 1] for p in pools) if strided else pools
    order = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()  # fmt: skip
    tables, used = [], 0
    for n, k, v, b in zip(seq, keys, values, need, strict=True):
        blocks = order[used : used + b]
        used += b
        for j, blk in enumerate(blocks):
            rows = slice(j * block_size, min(n, (j + 1) * block_size))
            m = rows.stop - rows.start
            k_pool[blk, :m] = k[rows].to(device)
            v_pool[blk, :m] = v[rows].to(device)
        tables.append(blocks)
    width = max(need) + 1
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return _case(q.to(dtype).to(device), k_pool, v_pool, new, seq, keys, values,
                 block_tables=table.to(device))  # fmt: skip


def _case(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, new: list[int],
          seq: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
          slots: list[int] | None = None, block_tables: torch.Tensor | None = None) -> Case:  # fmt: skip
    dev = q.device
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    scale = q.shape[-1] ** -0.5
    expected = reference_attention(
        q.double(), [k.double().to(dev) for k in keys], [v.double().to(dev) for v in values],
        new, scale,
    )  # fmt: skip

    def i32(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.int32, device=dev)

    return Case(q, k_cache, v_cache, i32(starts), i32(seq),
                None if slots is None else i32(slots), block_tables, list(new), seq,
                expected, scale)  # fmt: skip


def assert_matches(out: torch.Tensor, case: Case, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), case.expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.fixture
def caches() -> Iterator[list[VirtualKVCache]]:
    opened: list[VirtualKVCache] = []
    yield opened
    for c in opened:
        c.close()


def virtual_case(opened: list[VirtualKVCache], layout: str, heads: tuple[int, int],
                 dtype: torch.dtype, hd: int = 16, device: str = "cpu",
                 batch: tuple[list[int], list[int]] = MIXED, page: int | None = 4096,
                 max_len: int = 100, seed: int = 0) -> Case:  # fmt: skip
    """A real `VirtualKVCache`: each slot backed up to its length, the backed rows past it NaN."""
    ctx, new = batch
    spec = KVCacheSpec(2, heads[1], hd, len(ctx) + 1, max_len, dtype, page, layout)
    cache = VirtualKVCache(spec, backend=device, budget_bytes=1 << 30)
    opened.append(cache)
    slots = [cache.alloc_slot() for _ in ctx]
    slots = slots[1:] + slots[:1]  # slot order differs from request order
    seq = [c + n for c, n in zip(ctx, new, strict=True)]
    cache.step(dict(zip(slots, seq, strict=True)))
    k_cache, v_cache = cache.k_cache(1), cache.v_cache(1)
    for s, n in zip(slots, seq, strict=True):  # NaN past the length, as far as it is backed
        backed = min(max_len, int(cache.mapped_pages(s) * cache.layout.tokens_per_page))
        assert backed >= n
        k_cache[s, n:backed] = float("nan")
        v_cache[s, n:backed] = float("nan")
    return contiguous_case(k_cache, v_cache, slots, ctx, new, heads[0], seed)


# -- contiguous mode ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["per_layer", "cross_layer"])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_contiguous_virtual_cache_mixed_batch(
    layout: str, heads: tuple[int, int], dtype: torch.dtype, caches: list[VirtualKVCache]
) -> None:
    case = virtual_case(caches, layout, heads, dtype)
    assert case.k_cache.stride(0) > 100 * case.k_cache.stride(1)  # slots padded to whole pages
    if layout == "cross_layer":
        assert case.k_cache.stride(1) == 2 * heads[1] * 16  # layers interleaved per token
    assert_matches(case.run(*case.tiles()), case, dtype)


def test_contiguous_head_dim_32_one_kv_head(caches: list[VirtualKVCache]) -> None:
    """(fp16: `tl.dot` on bf16 gives wrong numbers under Triton 3.9's interpreter; bf16 runs in
    the `gpu` tests.)"""
    case = virtual_case(caches, "cross_layer", (4, 1), torch.float16, hd=32)
    assert_matches(case.run(*case.tiles(32), block_m=32, block_n=16), case, torch.float16)


@pytest.mark.parametrize("layout", ["per_layer", "cross_layer", "padded"])
def test_contiguous_dense_layouts_never_read_past_length(layout: str) -> None:
    """NaN-filled caches: one row read past a request's length would poison its output."""
    cache = DenseKVCache(1, 7, 96, 2, 16, torch.float32, "cpu", layout)
    if layout == "padded":
        assert cache.k_cache(0).stride(0) % cache.k_cache(0).stride(1)
    case = contiguous_case(cache.k_cache(0), cache.v_cache(0), [6, 0, 3, 1, 5, 2], *MIXED, 8)
    assert_matches(case.run(*case.tiles(16), block_m=16, block_n=32), case, torch.float32)
    assert_matches(case.run(*case.tiles(32), block_m=32, block_n=16), case, torch.float32)


def test_one_token_rows_alone() -> None:
    """A decode-only batch (every tile has one valid query row) through the prefill kernel."""
    cache = DenseKVCache(1, 4, 64, 2, 16, torch.float32, "cpu", "per_layer")
    case = contiguous_case(cache.k_cache(0), cache.v_cache(0), [3, 1, 0, 2],
                           [0, 15, 16, 63], [1, 1, 1, 1], 4)  # fmt: skip
    req, row = case.tiles()
    assert row == [0, 0, 0, 0]
    assert_matches(case.run(req, row), case, torch.float32)


# -- sentinel tiles -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["contiguous", "paged"])
def test_sentinel_tiles_do_nothing(mode: str) -> None:
    """A tile buffer padded with -1 gives the unpadded answer bit for bit; rows of requests no
    tile covers keep what `out` held (NaN)."""
    if mode == "paged":
        case = paged_case(*MIXED, (4, 2), 16, 4)
    else:
        cache = DenseKVCache(1, 6, 96, 2, 16, torch.float32, "cpu", "cross_layer")
        case = contiguous_case(cache.k_cache(0), cache.v_cache(0), [5, 0, 3, 1, 4, 2], *MIXED, 4)
    covered = [1, 2, 4]
    req, row = case.tiles(16, covered)
    size = max_tiles(case.q.shape[0], len(MIXED[0]), 16)
    assert size >= len(case.tiles()[0]) > len(req)
    padded_req, padded_row = pad_tiles(req, row, size)
    assert padded_req[len(req) :] == [-1] * (size - len(req))
    plain = case.run(req, row)
    padded = case.run(padded_req, padded_row)
    torch.testing.assert_close(padded, plain, rtol=0, atol=0, equal_nan=True)
    starts = case.query_start_loc.tolist()
    mask = torch.zeros(case.q.shape[0], dtype=torch.bool)
    for i in covered:
        mask[starts[i] : starts[i + 1]] = True
    assert torch.isfinite(padded[mask]).all() and torch.isnan(padded[~mask]).all()
    torch.testing.assert_close(padded[mask].double(), case.expected[mask], atol=2e-5, rtol=0)
    # Sentinels anywhere in the buffer, and a buffer of nothing but sentinels.
    mixed_req = [x for r in req for x in (r, -1)]
    mixed_row = [x for r in row for x in (r, 0)]
    torch.testing.assert_close(case.run(mixed_req, mixed_row), plain, rtol=0, atol=0, equal_nan=True)  # fmt: skip
    assert torch.isnan(case.run(*pad_tiles([], [], 5))).all()
    # The tensors a sentinel would index with -1 get a guard entry in front that makes request
    # -1 look like a real one (rows -T.. of q and out, which are guard rows too): a kernel that
    # ran a sentinel tile would store into out's guard rows.
    n = case.q.shape[0]
    guard_q = torch.cat([torch.randn_like(case.q), case.q])
    guard_out = torch.full_like(guard_q, float("nan"))

    def guarded(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([torch.full_like(t[:1], value), t])[1:]

    g = dataclasses.replace(
        case, q=guard_q[n:], query_start_loc=guarded(case.query_start_loc, -n),
        seq_lens=guarded(case.seq_lens, n),
        slots=None if case.slots is None else guarded(case.slots, 0),
        block_tables=None if case.block_tables is None else guarded(case.block_tables, 1),
    )  # fmt: skip
    g.run(padded_req, padded_row, out=guard_out[n:])
    assert torch.isnan(guard_out[:n]).all()
    torch.testing.assert_close(guard_out[n:], plain, rtol=0, atol=0, equal_nan=True)


def test_tile_helpers() -> None:
    assert pad_tiles([3, 1], [16, 0], 4) == ([3, 1, -1, -1], [16, 0, 0, 0])
    assert pad_tiles([], [], 0) == ([], [])
    with pytest.raises(ValueError, match="do not fit"):
        pad_tiles([0, 0, 1], [0, 16, 0], 2)
    with pytest.raises(ValueError, match="differ in length"):
        pad_tiles([0], [], 2)
    with pytest.raises(ValueError, match="block_m"):
        max_tiles(10, 2, 0)
    assert default_prefill_config(128, torch.device("cpu")) == (16, 16, 4, 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=16), st.sampled_from([16, 64, 128]))
def test_max_tiles_bounds_every_batch(query_lens: list[int], block_m: int) -> None:
    seq_lens = [n + 5 for n in query_lens]
    req, _ = prefill_tiles(range(len(query_lens)), query_lens, seq_lens, block_m)
    assert len(req) <= max_tiles(sum(query_lens), len(query_lens), block_m)


# -- paged mode -----------------------------------------------------------------------------


@pytest.mark.parametrize(("block_size", "strided"), [(4, False), (16, False), (8, True)])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2)])
def test_paged_mixed_batch(block_size: int, strided: bool, heads: tuple[int, int]) -> None:
    case = paged_case(*MIXED, heads, 16, block_size, strided=strided)
    assert_matches(case.run(*case.tiles()), case, torch.float32)


def test_paged_fp16() -> None:
    case = paged_case(*MIXED, (4, 2), 32, 16, dtype=torch.float16)
    assert_matches(case.run(*case.tiles()), case, torch.float16)


# -- errors ---------------------------------------------------------------------------------


def test_bad_input_is_rejected_clearly() -> None:
    cache = DenseKVCache(1, 2, 32, 2, 16)
    case = contiguous_case(cache.k_cache(0), cache.v_cache(0), [0, 1], [0, 4], [5, 3], 8)
    req, row = case.tiles()
    t_req, t_row = (torch.tensor(x, dtype=torch.int32) for x in (req, row))
    args = (case.q, case.k_cache, case.v_cache, case.query_start_loc, case.seq_lens, t_req, t_row,
            0.25, torch.empty_like(case.q))  # fmt: skip
    knobs = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    table = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="exactly one of slots"):
        prefill_attention(*args, **knobs)
    with pytest.raises(ValueError, match="exactly one of slots"):
        prefill_attention(*args, slots=case.slots, block_tables=table, **knobs)
    ok = {"slots": case.slots, **knobs}
    prefill_attention(*args, **ok)

    def bad(i: int, value: object, match: str, **extra: object) -> None:
        changed = list(args)
        changed[i] = value
        with pytest.raises(ValueError, match=match):
            prefill_attention(*changed, **{**ok, **extra})  # type: ignore[arg-type]

    bad(0, torch.zeros(8, 8, 32)[..., ::2], "contiguous last dimension")
    bad(0, case.q.half(), "dtypes differ")
    bad(8, torch.empty(8, 8, 8), "out must be shaped like q")
    bad(5, t_req.long(), "tile_req must be int32")
    bad(6, t_row[:1], "one length")
    bad(4, case.seq_lens[:1], r"query_start_loc \[B\+1\]")
    bad(1, case.k_cache[..., :8], "k_cache and v_cache")
    bad(0, case.q, "power of two >= 16", block_m=8)
    with pytest.raises(ValueError, match="slots must be"):
        prefill_attention(*args, **{**ok, "slots": case.slots[:1]})
    with pytest.raises(ValueError, match="block_tables must be"):
        prefill_attention(*args, block_tables=table[:1], **knobs)
    five = torch.zeros(8, 5, 16)
    with pytest.raises(ValueError, match="5 query heads are not a multiple of 2 kv heads"):
        prefill_attention(five, *args[1:8], torch.zeros_like(five), **ok)
    odd = DenseKVCache(1, 2, 32, 2, 24)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        prefill_attention(torch.zeros(8, 8, 24), odd.k_cache(0), odd.v_cache(0),
                          *args[3:8], torch.zeros(8, 8, 24), **ok)  # fmt: skip


# -- property test --------------------------------------------------------------------------

MODES = ["per_layer", "cross_layer", "padded", "paged4", "paged16"]


@settings(max_examples=10, deadline=None)
@given(
    batch=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40)), min_size=1, max_size=4),
    group=st.sampled_from([1, 3, 4]),
    num_kv_heads=st.sampled_from([1, 2]),
    mode=st.sampled_from(MODES),
    blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
    seed=st.integers(0, 2**16),
)
def test_random_batches_match_the_reference(batch: list[tuple[int, int]], group: int,
                                            num_kv_heads: int, mode: str,
                                            blocks: tuple[int, int], seed: int) -> None:  # fmt: skip
    ctx, new = [c for c, _ in batch], [n for _, n in batch]
    heads = (group * num_kv_heads, num_kv_heads)
    if mode.startswith("paged"):
        case = paged_case(ctx, new, heads, 16, int(mode[5:]), seed=seed)
    else:
        cache = DenseKVCache(1, len(batch) + 1, 80, num_kv_heads, 16, torch.float32, "cpu", mode)
        slots = list(range(len(batch), 0, -1))
        case = contiguous_case(cache.k_cache(0), cache.v_cache(0), slots, ctx, new, heads[0], seed)
    block_m, block_n = blocks
    assert_matches(case.run(*case.tiles(block_m), block_m=block_m, block_n=block_n), case,
                   torch.float32)  # fmt: skip


# -- GPU ------------------------------------------------------------------------------------

GPU_BATCH = ([0, 1500, 0, 700, 31, 0, 2047, 128], [2048, 548, 1, 1, 1000, 333, 1, 1920])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["per_layer", "cross_layer"])
def test_contiguous_virtual_cache_gpu(layout: str, caches: list[VirtualKVCache]) -> None:
    case = virtual_case(caches, layout, (32, 8), torch.bfloat16, hd=128, device="cuda",
                        batch=GPU_BATCH, page=None, max_len=2048)  # fmt: skip
    block_m, block_n, warps, stages = default_prefill_config(128, case.q.device)
    out = prefill_attention(
        case.q, case.k_cache, case.v_cache, case.query_start_loc, case.seq_lens,
        *(torch.tensor(x, dtype=torch.int32, device="cuda") for x in case.tiles(block_m)),
        case.scale, torch.full_like(case.q, float("nan")), slots=case.slots,
        block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    assert_matches(out, case, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 128])
def test_paged_gpu(block_size: int) -> None:
    case = paged_case(*GPU_BATCH, (32, 8), 128, block_size, torch.bfloat16, "cuda")
    block_m, block_n, warps, stages = default_prefill_config(128, case.q.device)
    out = prefill_attention(
        case.q, case.k_cache, case.v_cache, case.query_start_loc, case.seq_lens,
        *(torch.tensor(x, dtype=torch.int32, device="cuda") for x in case.tiles(block_m)),
        case.scale, torch.full_like(case.q, float("nan")), block_tables=case.block_tables,
        block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    assert_matches(out, case, torch.bfloat16)


@pytest.mark.gpu
def test_sentinel_tiles_in_a_cuda_graph_gpu() -> None:
    """Capture one launch over fixed-size buffers (tiles padded with -1), then refill every
    buffer in place for new batches and replay: each replay matches the reference."""
    hq, hkv, hd, max_len, max_seqs, max_tokens = 32, 8, 128, 2048, 8, 4096
    block_m, block_n, warps, stages = default_prefill_config(hd, torch.device("cuda"))
    cache = DenseKVCache(1, max_seqs, max_len, hkv, hd, torch.bfloat16, "cuda", "cross_layer")
    size = max_tiles(max_tokens, max_seqs, block_m)
    i32 = {"dtype": torch.int32, "device": "cuda"}
    q_buf = torch.zeros(max_tokens, hq, hd, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros_like(q_buf)
    qsl = torch.zeros(max_seqs + 1, **i32)
    seq_buf, slot_buf = torch.ones(max_seqs, **i32), torch.zeros(max_seqs, **i32)
    req_buf, row_buf = torch.full((size,), -1, **i32), torch.zeros(size, **i32)

    def launch() -> None:
        prefill_attention(q_buf, cache.k_cache(0), cache.v_cache(0), qsl, seq_buf, req_buf,
                          row_buf, hd**-0.5, out, slots=slot_buf, block_m=block_m,
                          block_n=block_n, num_warps=warps, num_stages=stages)  # fmt: skip

    launch()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    batches = [
        ([0, 100, 2000], [1000, 7, 48], [4, 0, 7]),
        ([1500, 0, 3, 0, 900, 10, 0, 64], [500, 300, 1, 1, 1024, 200, 900, 64], list(range(8))),
    ]
    for seed, (ctx, new, slots) in enumerate(batches):
        case = contiguous_case(cache.k_cache(0), cache.v_cache(0), slots, ctx, new, hq, seed)
        n, b = case.q.shape[0], len(ctx)
        req, row = pad_tiles(*case.tiles(block_m), size)
        q_buf[:n] = case.q
        qsl[: b + 1] = case.query_start_loc
        seq_buf[:b] = case.seq_lens
        assert case.slots is not None
        slot_buf[:b] = case.slots
        req_buf.copy_(torch.tensor(req, **i32))
        row_buf.copy_(torch.tensor(row, **i32))
        out.fill_(float("nan"))
        graph.replay()
        assert_matches(out[:n], case, torch.bfloat16)
        assert torch.isnan(out[n:]).all()
