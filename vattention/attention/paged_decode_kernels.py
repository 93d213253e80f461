"""Triton PagedAttention decode (one new token per request) over block tables, vLLM-v2 style.

`paged_decode(q, k_pool, v_pool, block_tables, seq_lens, scale, max_seq_len)`:
- stage 1, grid `(request, kv_head, partition)`: every request's context is cut into fixed-size
  partitions of `partition_size` tokens (a multiple of `BLOCK_N`); a program takes one partition
  and the query heads of one KV-head group (GQA: they share every K/V load), finds each token
  through the table (`pool[table[pos // block_size], pos % block_size]`, so any block size and
  any pool strides work) and runs an online softmax over `BLOCK_N`-token tiles. Programs whose
  partition starts past the request's length exit at once, so uneven lengths cost what they read;
- stage 2, grid `(request, head)`: combines the request's partitions by their log-sum-exp.
  With one partition, stage 1 writes the output and stage 2 is skipped.
The partition size comes from the batch shape (`default_partition_size`, shared with the
contiguous kernel), so the grid depends on host ints only (CUDA-graph safe).
Invariants: loads are masked to `pos < seq_len` (no block past a request's length is read);
offsets are 64-bit; softmax runs in float32, base 2, with `scale * log2(e)` folded in.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vattention.attention.decode_kernels import default_partition_size, num_sms

LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_stage1(
    Q, K, V, Tables, SeqLens, Out, Acc, Lse,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    stride_ab, stride_ah, stride_ap,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    qk_scale, partition_size,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SINGLE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    start = part * partition_size
    if start < seq_len:
        end = tl.minimum(start + partition_size, seq_len)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP
        heads = kv_head * GROUP + offs_g
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None],
            other=0.0,
        )
        table = Tables + b * stride_tb
        k_head = K + kv_head.to(tl.int64) * stride_kh
        v_head = V + kv_head.to(tl.int64) * stride_vh
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < end
            blk = tl.load(table + pos // PAGE, mask=n_mask, other=0).to(tl.int64)
            off = (pos % PAGE).to(tl.int64)
            k = tl.load(
                k_head + (blk * stride_kb + off * stride_kt)[:, None] + offs_d[None, :],
                mask=n_mask[:, None],
                other=0.0,
            )
            v = tl.load(
                v_head + (blk * stride_vb + off * stride_vt)[:, None] + offs_d[None, :],
                mask=n_mask[:, None],
                other=0.0,
            )
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]  # l_i >= 1: the partition holds at least one token
        if SINGLE:
            o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_mask[:, None])
        else:
            a_ptrs = Acc + b * stride_ab + heads[:, None] * stride_ah + part * stride_ap
            tl.store(a_ptrs + offs_d[None, :], out, mask=g_mask[:, None])
            lse = m_i + tl.log2(l_i)
            tl.store(Lse + b * stride_lb + heads * stride_lh + part, lse, mask=g_mask)


@triton.jit
def _paged_decode_stage2(
    Acc, Lse, SeqLens, Out,
    stride_ab, stride_ah, stride_ap,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    partition_size,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    num_parts = tl.cdiv(tl.load(SeqLens + b), partition_size)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        parts = p0 + offs_p
        p_mask = parts < num_parts
        lse = tl.load(Lse + b * stride_lb + h * stride_lh + parts, mask=p_mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        a_ptrs = Acc + b * stride_ab + h * stride_ah + parts[:, None] * stride_ap + offs_d[None, :]
        part_out = tl.load(a_ptrs, mask=p_mask[:, None], other=0.0)
        acc = acc * alpha + tl.sum(part_out * w[:, None], 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    partition_size: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of `q [B, Hq, D]` (one token each) over the first `seq_lens[b]` tokens that
    `block_tables[b]` points at in `k_pool`/`v_pool` `[blocks, block_size, Hkv, D]`.

    `max_seq_len` (host int, >= every `seq_lens[b]`, every `seq_lens[b] >= 1`) sizes the grid.
    Returns `[B, Hq, D]` in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    page, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("q, k_pool and v_pool need a contiguous last dimension")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"paged decode needs a power-of-two head_dim >= 16, got {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise TypeError("block_tables and seq_lens must be int32 tensors")
    group = num_heads // num_kv_heads
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32
    if partition_size is None:
        partition_size = default_partition_size(
            batch, num_kv_heads, max_seq_len, block_n, num_sms(q.device)
        )
    if partition_size < block_n or partition_size % block_n:
        raise ValueError(f"partition_size {partition_size} must be a multiple of {block_n}")
    num_parts = max(1, math.ceil(max_seq_len / partition_size))
    out = torch.empty_like(q)
    single = num_parts == 1
    if single:
        acc = lse = out  # not touched by the kernel
        a_strides: tuple[int, ...] = (0, 0, 0)
        l_strides: tuple[int, ...] = (0, 0)
    else:
        acc = torch.empty(
            batch, num_heads, num_parts, head_dim, device=q.device, dtype=torch.float32
        )
        lse = torch.empty(batch, num_heads, num_parts, device=q.device, dtype=torch.float32)
        a_strides, l_strides = acc.stride()[:3], lse.stride()[:2]
    _paged_decode_stage1[(batch, num_kv_heads, num_parts)](
        q, k_pool, v_pool, block_tables, seq_lens, out, acc, lse,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        block_tables.stride(0),
        *a_strides, *l_strides,
        out.stride(0), out.stride(1),
        scale * LOG2E, partition_size,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=block_n, PAGE=page, SINGLE=single,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if not single:
        _paged_decode_stage2[(batch, num_heads)](
            acc, lse, seq_lens, out,
            *a_strides, *l_strides,
            out.stride(0), out.stride(1),
            partition_size,
            HEAD_DIM=head_dim, BLOCK_P=min(32, triton.next_power_of_2(num_parts)),
            num_warps=4,
        )  # fmt: skip
    return out
