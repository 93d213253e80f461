"""Triton causal prefill (varlen FlashAttention-2 forward) over either KV cache.

`prefill_attention(q, k_cache, v_cache, query_start_loc, seq_lens, tile_req, tile_row, scale,
out, *, slots=None, block_tables=None, ...)`: the queries of request b are rows
`query_start_loc[b]:query_start_loc[b+1]` of q; query j sits at position
`seq_len_b - query_len_b + j` and sees the cached keys at positions `<=` that (bottom-right
causal: fresh prompts, chunks continuing a cached context and 1-token decode rows alike).
One kernel, two ways to find token `pos` of request b (the `PAGED` constexpr):
- contiguous (`slots`): `cache[slots[b], pos]` by strides, so per-layer tensors, the cross-layer
  layout (layers interleaved per token) and padded slot strides all work;
- paged (`block_tables`): `pool[table[b, pos // BLOCK_SIZE], pos % BLOCK_SIZE]`.
Grid `(tiles, query heads)`: a program takes one `BLOCK_M`-query tile of one request (`tile_req`,
`tile_row`: request index and first query row, from `prefill_tiles`) and one query head, and
streams K/V in `BLOCK_N`-token tiles in two loops: the key tiles every query of the tile sees
whole (no mask), then the ones on the diagonal (causal mask).
Sentinel tiles: a program whose `tile_req` entry is negative returns at once. A caller can keep
a fixed-size tile buffer (a fixed grid, CUDA-graph safe), refill it every step and pad its tail
with -1 (`max_tiles`, `pad_tiles`).
Invariants: the K/V of the new tokens are in the cache already; keys are never read past the
tile's last query position (so never past a request's length: unbacked rows of a virtual cache
and blocks past a table's used part are not touched); offsets are 64-bit (a virtual cache can
exceed 2^31 elements); softmax runs in float32, base 2, with `scale * log2(e)` folded in; dots
use `ieee` precision for float32 inputs and `tf32` otherwise; rows past a request's queries are
computed but never stored, and rows no tile covers are left as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vattention.attention.decode_kernels import LOG2E


@triton.jit
def _kv_tile(k_base, v_base, table, pos, n_mask, stride_kb, stride_kt, stride_vb, stride_vt,
             offs_d, PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """K and V rows of positions `pos` (masked loads if MASKED). Paged: `k_base` is the pool's
    head, rows found through `table`; contiguous: `k_base` is the slot's head, rows by stride."""
    if PAGED:
        if MASKED:
            blk = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        else:
            blk = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
        within = (pos % BLOCK_SIZE).to(tl.int64)
        k_rows = blk * stride_kb + within * stride_kt
        v_rows = blk * stride_vb + within * stride_vt
    else:
        rows = pos.to(tl.int64)
        k_rows = rows * stride_kt
        v_rows = rows * stride_vt
    k_ptrs = k_base + k_rows[:, None] + offs_d[None, :]
    v_ptrs = v_base + v_rows[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=n_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _prefill_kernel(
    Q, K, V, Slots, Tables, QueryStart, SeqLens, TileReq, TileRow, Out,
    stride_qt, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_tb,
    stride_ot, stride_oh,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    req32 = tl.load(TileReq + tile)
    if req32 >= 0:  # a negative request index marks a sentinel (padding) tile: nothing to do
        req = req32.to(tl.int64)
        m0 = tl.load(TileRow + tile)
        q_start = tl.load(QueryStart + req)
        q_len = tl.load(QueryStart + req + 1) - q_start
        seq_len = tl.load(SeqLens + req)
        ctx = seq_len - q_len
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        m_mask = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=m_mask[:, None],
            other=0.0,
        )
        kv_head = (head // GROUP).to(tl.int64)
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
        table = Tables
        if PAGED:  # token pos of request req: pool[table[req, pos // BLOCK_SIZE], pos % ...]
            table = Tables + req * stride_tb
        else:  # ... or cache[slot, pos]
            slot = tl.load(Slots + req).to(tl.int64)
            k_base += slot * stride_ks
            v_base += slot * stride_vs
        q_pos = ctx + offs_m  # position of each query row
        full_end = (ctx + m0 + 1) // BLOCK_N * BLOCK_N  # keys below: seen by every row
        end = ctx + tl.minimum(m0 + BLOCK_M, q_len)  # one past the last key any row may see

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for n0 in range(0, full_end, BLOCK_N):
            pos = n0 + offs_n
            k, v = _kv_tile(k_base, v_base, table, pos, pos < full_end,
                            stride_ks, stride_kt, stride_vs, stride_vt, offs_d,
                            PAGED, BLOCK_SIZE, False)  # fmt: skip
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        for n0 in range(full_end, end, BLOCK_N):
            pos = n0 + offs_n
            k, v = _kv_tile(k_base, v_base, table, pos, pos < end,
                            stride_ks, stride_kt, stride_vs, stride_vt, offs_d,
                            PAGED, BLOCK_SIZE, True)  # fmt: skip
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            seen = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] < end)
            qk = tl.where(seen, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # valid rows see key 0 at least
        o_ptrs = Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None])


def prefill_tiles(
    requests: Sequence[int],
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_m: int,
) -> tuple[list[int], list[int]]:
    """`(request index, first query row)` of every `block_m`-query tile of `requests`, the
    tiles with the most keys to read first (better load balance for the causal triangle)."""
    tiles = []
    for i in requests:
        ctx = seq_lens[i] - query_lens[i]
        for m0 in range(0, query_lens[i], block_m):
            last = min(m0 + block_m, query_lens[i])
            tiles.append((ctx + last, i, m0))
    tiles.sort(key=lambda t: -t[0])
    return [t[1] for t in tiles], [t[2] for t in tiles]


def max_tiles(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """An upper bound of `len(prefill_tiles(...))` for any batch of `num_seqs` requests bringing
    `num_tokens` new tokens in total: `ceil(n / m) <= n // m + 1` per request, and the floors
    sum to at most `num_tokens // block_m`. Sizes a fixed tile buffer (CUDA graphs)."""
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    return num_tokens // block_m + num_seqs


def pad_tiles(req: Sequence[int], row: Sequence[int], size: int) -> tuple[list[int], list[int]]:
    """`req` and `row` padded to `size` entries with sentinel tiles (request -1, row 0)."""
    if len(req) != len(row):
        raise ValueError(f"req and row differ in length: {len(req)} != {len(row)}")
    if len(req) > size:
        raise ValueError(f"{len(req)} tiles do not fit a buffer of {size}")
    pad = size - len(req)
    return list(req) + [-1] * pad, list(row) + [0] * pad


def default_prefill_config(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """`(BLOCK_M, BLOCK_N, num_warps, num_stages)`: large tiles on CUDA, tiny under the
    interpreter."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tile_req: torch.Tensor,
    tile_row: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    slots: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """Fill the rows of `out [T, Hq, D]` that the tiles cover (see the module docstring).

    q `[T, Hq, D]`; `query_start_loc [B+1]` and `seq_lens [B]` int32. Give exactly one of
    `slots [B]` int32 (contiguous: `k_cache`/`v_cache` are `[slots, max_len, Hkv, D]`, any
    strides) or `block_tables [B, W]` int32 (paged: they are pools `[blocks, block_size, Hkv,
    D]`). `tile_req`/`tile_row` are int32 device copies of `prefill_tiles(..., block_m)` (the
    same `block_m`), possibly padded with sentinel tiles (`pad_tiles`). Returns `out`.
    """
    if (slots is None) == (block_tables is None):
        raise ValueError("give exactly one of slots (contiguous cache) or block_tables (paged)")
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache and v_cache must both be [slots or blocks, tokens, kv_heads, {head_dim}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_kv_heads = k_cache.shape[2]
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")  # fmt: skip
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension")
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError("out must be shaped like q with a contiguous last dimension")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"prefill attention needs a power-of-two head_dim >= 16, got {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    batch = seq_lens.numel()
    if seq_lens.dim() != 1 or query_start_loc.shape != (batch + 1,):
        raise ValueError(
            f"seq_lens must be [B] and query_start_loc [B+1], got {tuple(seq_lens.shape)} and "
            f"{tuple(query_start_loc.shape)}"
        )
    if tile_req.dim() != 1 or tile_req.shape != tile_row.shape:
        raise ValueError(
            f"tile_req and tile_row must be 1-D of one length, got {tuple(tile_req.shape)} and "
            f"{tuple(tile_row.shape)}"
        )
    index_tensors = {"query_start_loc": query_start_loc, "seq_lens": seq_lens,
                     "tile_req": tile_req, "tile_row": tile_row}  # fmt: skip
    if slots is not None:
        if slots.shape != (batch,):
            raise ValueError(f"slots must be [B] = [{batch}], got {tuple(slots.shape)}")
        index_tensors["slots"] = slots
    if block_tables is not None:
        if block_tables.dim() != 2 or block_tables.shape[0] != batch:
            raise ValueError(f"block_tables must be [B={batch}, W], got "
                             f"{tuple(block_tables.shape)}")  # fmt: skip
        index_tensors["block_tables"] = block_tables
    for name, t in index_tensors.items():
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    for name, t in {"k_cache": k_cache, "v_cache": v_cache, "out": out, **index_tensors}.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if tile_req.numel() == 0:
        return out
    paged = block_tables is not None
    tables = block_tables if block_tables is not None else seq_lens  # unused when contiguous
    slot_ids = slots if slots is not None else seq_lens  # unused when paged
    _prefill_kernel[(tile_req.numel(), num_heads)](
        q, k_cache, v_cache, slot_ids, tables, query_start_loc, seq_lens, tile_req, tile_row, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        tables.stride(0),
        out.stride(0), out.stride(1),
        scale * LOG2E,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGED=paged, BLOCK_SIZE=k_cache.shape[1] if paged else 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
