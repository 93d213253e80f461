"""Triton split-K ("flash-decoding") attention for one new token per request, contiguous cache.

`decode_attention(q, k_cache, v_cache, slots, seq_lens, scale)`:
- stage 1, grid `(request, kv_head, split)`: a program takes the query heads of one KV-head
  group (GQA: they share every K/V load) and one split of the request's context, and runs an
  online softmax over `BLOCK_N`-row tiles of K and V, read by strides from
  `cache[slot, pos, kv_head, :]` (so per-layer tensors and cross-layer strided views both work);
- stage 2, grid `(request, head)`: combines the splits' partial outputs by their log-sum-exp.
  With one split, stage 1 writes the final output and stage 2 is skipped.
With `block_tables` the same kernel reads a paged cache (the PagedAttention baseline `pa_triton`):
token `pos` of request b is at `pool[table[b, pos // block_size], pos % block_size]`.
Invariants: loads are masked to `pos < seq_len`, so rows past a request's length (possibly
unbacked memory) are never touched; offsets are 64-bit (a virtual cache can exceed 2^31
elements); softmax runs in float32 in base 2 with `scale * log2(e)` folded in.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(
    Q, K, V, Slots, SeqLens, Acc, Lse, Out, Tables,
    stride_qb, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    qk_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
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
    k_base = K + kv_head.to(tl.int64) * stride_kh
    v_base = V + kv_head.to(tl.int64) * stride_vh
    if PAGED:  # token pos of request b lives at pool[table[b, pos // BLOCK_SIZE], pos % BLOCK_SIZE]
        table = Tables + b.to(tl.int64) * stride_tb
    else:  # ... or at cache[slot, pos]
        slot = tl.load(Slots + b).to(tl.int64)
        k_base += slot * stride_ks
        v_base += slot * stride_vs

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        if PAGED:
            blk = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            within = (pos % BLOCK_SIZE).to(tl.int64)
            k_rows = blk * stride_ks + within * stride_kt
            v_rows = blk * stride_vs + within * stride_vt
        else:
            rows = pos.to(tl.int64)
            k_rows = rows * stride_kt
            v_rows = rows * stride_vt
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


@triton.jit
def _combine_kernel(
    Acc, Lse, Out,
    stride_ab, stride_ah, stride_as,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    NUM_SPLITS, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)  # finite unless seq_len == 0 (a padding row): then output zeros
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(w, 0)
    w = w / tl.where(total == 0.0, 1.0, total)
    a_ptrs = Acc + b * stride_ab + h * stride_ah + offs_s[:, None] * stride_as + offs_d[None, :]
    acc = tl.load(a_ptrs, mask=s_mask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def default_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, num_sms: int
) -> int:
    """Splits that give about 4 programs per SM, each over at least 4 tiles of context."""
    programs = batch * num_kv_heads
    want = math.ceil(4 * num_sms / programs)
    cap = max(1, math.ceil(max_seq_len / (4 * block_n)))
    return max(1, min(want, cap, 128))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    block_tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of `q [B, Hq, D]` (one token per request) over `cache[slots[b], :seq_lens[b]]`.

    `k_cache`/`v_cache`: `[slots, max_len, Hkv, D]`, any strides with a contiguous last dim.
    With `block_tables [B, max_blocks]` they are paged pools `[blocks, block_size, Hkv, D]`
    instead (the PagedAttention baseline: same kernel, table addressing) and `slots` is unused.
    `max_seq_len` (host int, >= every `seq_lens[b]`) sizes the split count. Returns `[B, Hq, D]`.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"triton decode needs a power-of-two head_dim >= 16, got {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
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
        acc = lse = out  # unused by the kernel
        a_strides: tuple[int, ...] = (0, 0, 0)
        l_strides: tuple[int, ...] = (0, 0)
    else:
        acc = torch.empty(
            batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32
        )
        lse = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
        a_strides, l_strides = acc.stride()[:3], lse.stride()[:2]
    paged = block_tables is not None
    tables = block_tables if block_tables is not None else seq_lens  # unused when not paged
    _split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, slots, seq_lens, acc, lse, out, tables,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        tables.stride(0),
        *a_strides, *l_strides,
        out.stride(0), out.stride(1),
        scale * LOG2E,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=block_n, SINGLE=single,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PAGED=paged, BLOCK_SIZE=k_cache.shape[1] if paged else 1,
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
