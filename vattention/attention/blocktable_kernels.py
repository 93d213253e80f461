"""Triton split-K decode over a *paged* KV cache (the PagedAttention baseline's decode kernel).

The same kernel as `decode_kernels` (GQA groups sharing K/V loads, online softmax in base 2,
split-K with a log-sum-exp combine), except for one thing: token `pos` of request `b` is found
through its block table, at `pool[table[b, pos // block_size], pos % block_size]`, instead of at
`cache[slot, pos]`. Keeping everything else identical makes the contiguous-vs-paged comparison
measure the addressing and nothing else.
Invariants: loads are masked to `pos < seq_len`; offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vattention.attention.decode_kernels import (
    LOG2E,
    _combine_kernel,
    _num_sms,
    default_num_splits,
)


@triton.jit
def _paged_split_kernel(
    Q, K, V, Tables, SeqLens, Acc, Lse, Out,
    stride_qb, stride_qh,
    stride_kblk, stride_kt, stride_kh,
    stride_vblk, stride_vt, stride_vh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    qk_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SINGLE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(SeqLens + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0)
    table = Tables + b.to(tl.int64) * stride_tb
    k_base = K + kv_head.to(tl.int64) * stride_kh
    v_base = V + kv_head.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        blk = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        within = (pos % BLOCK_SIZE).to(tl.int64)
        k_rows = blk * stride_kblk + within * stride_kt
        v_rows = blk * stride_vblk + within * stride_vt
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if SINGLE:
        o_ptrs = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_mask[:, None])
    else:
        a_ptrs = (
            Acc
            + b.to(tl.int64) * stride_ab
            + heads[:, None] * stride_ah
            + split * stride_as
            + offs_d[None, :]
        )
        tl.store(a_ptrs, out, mask=g_mask[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Lse + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of `q [B, Hq, D]` over the paged pools `[blocks, block_size, Hkv, D]`."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"paged triton decode needs a power-of-two head_dim >= 16, got {head_dim}")
    group = num_heads // num_kv_heads
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32
    if num_splits is None:
        num_splits = default_num_splits(
            batch, num_kv_heads, max_seq_len, block_n, _num_sms(q.device)
        )
    out = torch.empty_like(q)
    single = num_splits == 1
    if single:
        acc = lse = out
        a_strides: tuple[int, ...] = (0, 0, 0)
        l_strides: tuple[int, ...] = (0, 0)
    else:
        acc = torch.empty(
            batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32
        )
        lse = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
        a_strides, l_strides = acc.stride()[:3], lse.stride()[:2]
    _paged_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_pool, v_pool, block_tables, seq_lens, acc, lse, out,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        block_tables.stride(0),
        *a_strides, *l_strides,
        out.stride(0), out.stride(1),
        scale * LOG2E,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=block_n, BLOCK_SIZE=block_size, SINGLE=single,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if not single:
        _combine_kernel[(batch, num_heads)](
            acc, lse, out,
            *a_strides, *l_strides,
            out.stride(0), out.stride(1),
            num_splits, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )  # fmt: skip
    return out
