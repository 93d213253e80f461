"""Triton causal prefill (fresh prompts and chunked prefill) over block tables.

`paged_prefill(q, k_pool, v_pool, block_tables, query_start_loc, seq_lens, tiles, scale, out)`:
FlashAttention-2 forward over a paged cache. The queries of request i are rows
`query_start_loc[i]:query_start_loc[i+1]` of q; query j sits at position
`seq_len_i - query_len_i + j` and sees the cached keys at positions `<=` that. A grid row is one
`BLOCK_M`-query tile of one request (`tiles`: request index and first query of each tile, from
`prefill_tiles`), a grid column one query head; the program streams K/V in `BLOCK_N`-token tiles,
each token found through the table, in two loops: tiles every query of the tile may see whole
(no mask), then the tiles on the diagonal (causal mask). Keys are never read past the tile's
last query position, so no block past a request's length is touched.
Invariants: the new tokens' K/V are in the cache already (`write_kv` ran); offsets are 64-bit;
softmax runs in float32, base 2, with `scale * log2(e)` folded in; rows past a request's
queries are computed but never stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vattention.attention.paged_decode_kernels import LOG2E


@triton.jit
def _kv_tile(table, pos, n_mask, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt,
             offs_d, PAGE: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """K and V rows of positions `pos`, found through the block table (masked loads if MASKED)."""
    if MASKED:
        blk = tl.load(table + pos // PAGE, mask=n_mask, other=0).to(tl.int64)
    else:
        blk = tl.load(table + pos // PAGE).to(tl.int64)
    off = (pos % PAGE).to(tl.int64)
    k_ptrs = k_head + (blk * stride_kb + off * stride_kt)[:, None] + offs_d[None, :]
    v_ptrs = v_head + (blk * stride_vb + off * stride_vt)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=n_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _paged_prefill_kernel(
    Q, K, V, Tables, QueryStart, SeqLens, TileReq, TileRow, Out,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    stride_ot, stride_oh,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    req = tl.load(TileReq + tile).to(tl.int64)
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
    k_head = K + kv_head * stride_kh
    v_head = V + kv_head * stride_vh
    table = Tables + req * stride_tb
    q_pos = ctx + offs_m  # position of each query row
    full_end = (ctx + m0 + 1) // BLOCK_N * BLOCK_N  # keys below: seen by every row of the tile
    end = ctx + tl.minimum(m0 + BLOCK_M, q_len)  # one past the last key any row may see

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        pos = n0 + offs_n
        k, v = _kv_tile(table, pos, pos < full_end, k_head, v_head,
                        stride_kb, stride_kt, stride_vb, stride_vt, offs_d, PAGE, False)  # fmt: skip
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    for n0 in range(full_end, end, BLOCK_N):
        pos = n0 + offs_n
        k, v = _kv_tile(table, pos, pos < end, k_head, v_head,
                        stride_kb, stride_kt, stride_vb, stride_vt, offs_d, PAGE, True)  # fmt: skip
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        seen = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] < end)
        qk = tl.where(seen, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]  # every row sees key 0 at least
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


def paged_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tile_req: torch.Tensor,
    tile_row: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """Fill the rows of `out [T, Hq, D]` that the tiles cover (see the module docstring);
    `tile_req`/`tile_row` are int32 device copies of `prefill_tiles(...)` for `block_m`."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_pool.shape[2]
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("q, k_pool and v_pool need a contiguous last dimension")
    if out.stride(-1) != 1 or out.shape != q.shape:
        raise ValueError("out must be shaped like q with a contiguous last dimension")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"paged prefill needs a power-of-two head_dim >= 16, got {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if tile_req.numel() == 0:
        return out
    _paged_prefill_kernel[(tile_req.numel(), num_heads)](
        q, k_pool, v_pool, block_tables, query_start_loc, seq_lens, tile_req, tile_row, out,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale * LOG2E,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=k_pool.shape[1], DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
