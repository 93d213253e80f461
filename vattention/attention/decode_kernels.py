"""Triton split-K ("flash-decoding") attention for one new token per request, contiguous cache.

`decode_attention(q, k_cache, v_cache, slots, seq_lens, scale)`:
- stage 1, grid `(request, kv_head, partition)`: every request's context is cut into fixed-size
  partitions of `partition_size` tokens (a multiple of `BLOCK_N`); a program takes the query
  heads of one KV-head group (GQA: they share every K/V load) and one partition, and runs an
  online softmax over `BLOCK_N`-row tiles of K and V, read by strides from
  `cache[slot, pos, kv_head, :]` (so per-layer tensors and cross-layer strided views both work).
  Programs whose partition starts past the request's length exit at once: uneven lengths cost
  what they read, and the grid (sized by the host's `max_seq_len`) is CUDA-graph safe;
- the combine, in the same launch: a request whose context fits one partition has its output
  written by that partition's program directly; otherwise each of its `cdiv(seq_len,
  partition_size)` programs stores its partial (normalized output and log-sum-exp) and counts
  itself in the request's per-KV-head counter, and the program that counts last merges the
  partials by their log-sum-exp and resets the counter to 0. So every call leaves its counters
  at 0; calls that share a counter buffer (`_counters`: one per device, made outside CUDA-graph
  capture) must not overlap on the GPU (the engine runs them in order on one stream).
The default partition size (`default_partition_size`) aims at about 32 programs per SM with at
least 256 tokens each (measured on the H200 against a split of each request's own length into a
fixed count: the fixed partitions balance uneven batches better).
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

from vattention.attention.shared_prefix import SharedPrefix

LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(
    Q, K, V, Slots, SeqLens, Acc, Lse, Out, Tables, Counters, PrefixLens,
    stride_qb, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    qk_scale, partition_size, prefix_partition_size, suffix_base,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
    CASCADE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    pre = 0  # tokens of a shared prefix attended by `_prefix_kernel` (CASCADE), not here
    if CASCADE:
        pre = tl.load(PrefixLens + b)
    start = pre + split * partition_size
    if (start < seq_len) | (split == 0):  # partitions past the request's context do nothing
        end = tl.minimum(start + partition_size, seq_len)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP
        heads = kv_head * GROUP + offs_g
        q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0)
        k_base = K + kv_head.to(tl.int64) * stride_kh
        v_base = V + kv_head.to(tl.int64) * stride_vh
        if PAGED:  # token pos of request b: pool[table[b, pos // BLOCK_SIZE], pos % BLOCK_SIZE]
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
            kv_mask = n_mask[:, None]
            k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
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
        o_ptrs = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        # the partitions of this request that run (padding rows, seq_len 0, run partition 0),
        # and the shared prefix's partials `_prefix_kernel` left at slots [0, pre_parts)
        parts = tl.maximum(tl.cdiv(seq_len - pre, partition_size), 1)
        pre_parts = 0
        if CASCADE:
            pre_parts = tl.cdiv(pre, prefix_partition_size)
        if SINGLE or ((parts == 1) & (pre_parts == 0)):
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_mask[:, None])
        else:
            acc_base = Acc + b.to(tl.int64) * stride_ab + heads[:, None] * stride_ah
            lse_base = Lse + b.to(tl.int64) * stride_lb + heads * stride_lh
            own = suffix_base + split
            tl.store(acc_base + own * stride_as + offs_d[None, :], out, mask=g_mask[:, None])
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
            tl.store(lse_base + own, lse, mask=g_mask)
            tl.debug_barrier()  # every thread's partial is stored before the count releases it
            counter = Counters + b * tl.num_programs(1) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == parts - 1:  # the last to finish
                tl.atomic_xchg(counter, 0)  # ready for the next call
                # partial slots in use: [0, pre_parts) and [suffix_base, suffix_base + parts)
                offs_s = tl.arange(0, BLOCK_S)
                used = (offs_s < pre_parts) | (
                    (offs_s >= suffix_base) & (offs_s < suffix_base + parts)
                )
                every = tl.load(
                    lse_base[:, None] + offs_s[None, :],
                    mask=g_mask[:, None] & used[None, :],
                    other=float("-inf"),
                    cache_modifier=".cg",  # written by other programs: read past L1
                )
                m = tl.max(every, 1)
                m = tl.where(m == float("-inf"), 0.0, m)
                total = tl.sum(tl.exp2(every - m[:, None]), 1)
                total = tl.where(total == 0.0, 1.0, total)
                merged = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
                for s in range(0, suffix_base + parts):
                    ok = (s < pre_parts) | (s >= suffix_base)  # slots between: not written
                    lse_s = tl.load(
                        lse_base + s, mask=g_mask, other=float("-inf"), cache_modifier=".cg"
                    )
                    w = tl.where(ok, tl.exp2(lse_s - m), 0.0)
                    part = tl.load(
                        acc_base + s * stride_as + offs_d[None, :],
                        mask=g_mask[:, None],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    merged += tl.where(ok, part * (w / total)[:, None], 0.0)
                tl.store(o_ptrs, merged.to(Out.dtype.element_ty), mask=g_mask[:, None])


@triton.jit
def _prefix_kernel(
    Q, K, V, PrefixLens, PrefixLen, Leader, Acc, Lse, Tables,
    batch,
    stride_qb, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_lb, stride_lh,
    qk_scale, part_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """Grid `(row tiles, kv_head, prefix partition)`: the query rows of every request that
    shares the prefix (`PrefixLens[b] > 0`), `BLOCK_M` (request, head of the KV head's group)
    rows at a time, against the prefix's K/V read once from the leader's slot (or block-table
    row); each program stores one partial (normalized output, log-sum-exp) per row."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    length = tl.load(PrefixLen)
    start = part * part_size
    if start < length:
        end = tl.minimum(start + part_size, length)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        b = offs_m // GROUP
        heads = kv_head * GROUP + offs_m % GROUP
        in_batch = b < batch
        member = in_batch & (tl.load(PrefixLens + b, mask=in_batch, other=0) > 0)
        b64 = b.to(tl.int64)
        q = tl.load(
            Q + b64[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=member[:, None],
            other=0.0,
        )
        leader = tl.load(Leader).to(tl.int64)
        k_base = K + kv_head.to(tl.int64) * stride_kh
        v_base = V + kv_head.to(tl.int64) * stride_vh
        if PAGED:
            table = Tables + leader * stride_tb
        else:
            k_base += leader * stride_ks
            v_base += leader * stride_vs
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < end
            if PAGED:
                blk = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
                within = (pos % BLOCK_SIZE).to(tl.int64)
                k_rows = blk * stride_ks + within * stride_kt
                v_rows = blk * stride_vs + within * stride_vt
            else:
                k_rows = pos.to(tl.int64) * stride_kt
                v_rows = pos.to(tl.int64) * stride_vt
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
        out = acc / l_i[:, None]  # a member's partition holds at least one prefix token
        lse = m_i + tl.log2(l_i)
        row_acc = Acc + b64 * stride_ab + heads * stride_ah + part * stride_as
        tl.store(row_acc[:, None] + offs_d[None, :], out, mask=member[:, None])
        tl.store(Lse + b64 * stride_lb + heads * stride_lh + part, lse, mask=member)


MAX_PARTITIONS = 128  # the last program reads a request's log-sum-exps in one tile


def default_partition_size(
    batch: int,
    num_kv_heads: int,
    max_seq_len: int,
    block_n: int,
    sms: int,
    *,
    programs_per_sm: int = 32,
    min_size: int = 256,
) -> int:
    """Partition size (a multiple of `block_n`): enough programs for about `programs_per_sm` per
    SM, so that uneven lengths still balance, but partitions of at least `min_size` tokens
    (fewer partials to combine) and at most `MAX_PARTITIONS` per request. The defaults were the
    best of `benchmarks/tune_decode.py`'s grid (8/16/32 programs per SM x 256/512 tokens) on the
    H200 for long contexts; the paged baseline uses the same heuristic."""
    want_parts = max(1, math.ceil(programs_per_sm * sms / max(1, batch * num_kv_heads)))
    size = max(
        math.ceil(max_seq_len / want_parts), min_size, math.ceil(max_seq_len / MAX_PARTITIONS)
    )
    return math.ceil(size / block_n) * block_n


def splits_to_partition_size(max_seq_len: int, num_splits: int, block_n: int) -> int:
    """The partition size that cuts a `max_seq_len` context into `num_splits` partitions."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    size = math.ceil(max(1, max_seq_len) / num_splits)
    return max(block_n, math.ceil(size / block_n) * block_n)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere)."""
    if device.type != "cuda":
        return 1
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


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
    partition_size: int | None = None,
    prefix: SharedPrefix | None = None,
) -> torch.Tensor:
    """Attention of `q [B, Hq, D]` (one token per request) over `cache[slots[b], :seq_lens[b]]`.

    `k_cache`/`v_cache`: `[slots, max_len, Hkv, D]`, any strides with a contiguous last dim.
    With `block_tables [B, max_blocks]` they are paged pools `[blocks, block_size, Hkv, D]`
    instead (the PagedAttention baseline: same kernel, table addressing) and `slots` is unused.
    `max_seq_len` (host int, >= every `seq_lens[b]`) sizes the grid. The partition size is
    `partition_size`, else the one that cuts `max_seq_len` into `num_splits` partitions, else
    `default_partition_size`. Returns `[B, Hq, D]`.

    With `prefix` (cascade decoding): the requests with `prefix.lens[b] > 0` share their first
    `prefix.lens[b] == prefix.length` tokens with the leader (the same K/V, as when they map
    the same physical pages); one launch attends all of their queries to those tokens, read
    once from the leader's slot (block-table row when paged), and the split-K launch attends
    each request's own tokens after them and merges both by log-sum-exp.
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
    if partition_size is None:
        if num_splits is not None:
            partition_size = splits_to_partition_size(max_seq_len, num_splits, block_n)
        else:
            partition_size = default_partition_size(
                batch, num_kv_heads, max_seq_len, block_n, num_sms(q.device)
            )
        if prefix is not None:  # half the partials' room for the prefix's (at most 64)
            half = -(-max(1, max_seq_len) // (MAX_PARTITIONS // 2))
            partition_size = max(partition_size, -(-half // block_n) * block_n)
    if partition_size < block_n or partition_size % block_n:
        raise ValueError(f"partition_size {partition_size} must be a multiple of {block_n}")
    num_parts = max(1, math.ceil(max_seq_len / partition_size))
    if num_parts > MAX_PARTITIONS:
        raise ValueError(
            f"{num_parts} partitions of {partition_size} tokens for max_seq_len {max_seq_len}: "
            f"at most {MAX_PARTITIONS}"
        )
    pre_parts, pre_size = 0, 1
    if prefix is not None:
        pre_size = prefix.partition_size or prefix_partition_size(
            batch, group, num_kv_heads, prefix.max_length, block_n, num_sms(q.device)
        )
        if pre_size < block_n or pre_size % block_n:
            raise ValueError(f"prefix partition size {pre_size} must be a multiple of {block_n}")
        pre_parts = math.ceil(prefix.max_length / pre_size)
    if pre_parts + num_parts > MAX_PARTITIONS:
        raise ValueError(
            f"{pre_parts} prefix and {num_parts} partitions: at most {MAX_PARTITIONS} in all"
        )
    out = torch.empty_like(q)
    single = num_parts == 1 and prefix is None
    if single:
        acc = lse = out  # unused by the kernel
        a_strides: tuple[int, ...] = (0, 0, 0)
        l_strides: tuple[int, ...] = (0, 0)
    else:
        width = pre_parts + num_parts  # the prefix's partials first, then the request's own
        acc = torch.empty(batch, num_heads, width, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(batch, num_heads, width, device=q.device, dtype=torch.float32)
        a_strides, l_strides = acc.stride()[:3], lse.stride()[:2]
    paged = block_tables is not None
    tables = block_tables if block_tables is not None else seq_lens  # unused when not paged
    counters = seq_lens if single else _counters(q.device, batch * num_kv_heads)
    dot = "ieee" if q.dtype == torch.float32 else "tf32"
    block_size = k_cache.shape[1] if paged else 1
    strides = (
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        tables.stride(0),
    )  # fmt: skip
    if prefix is not None and pre_parts:
        block_m = 64
        _prefix_kernel[(triton.cdiv(batch * group, block_m), num_kv_heads, pre_parts)](
            q, k_cache, v_cache, prefix.lens, prefix.length, prefix.leader, acc, lse, tables,
            batch, q.stride(0), q.stride(1), *strides, *a_strides, *l_strides,
            scale * LOG2E, pre_size,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION=dot, PAGED=paged, BLOCK_SIZE=block_size,
            num_warps=4, num_stages=num_stages,
        )  # fmt: skip
    _split_kernel[(batch, num_kv_heads, num_parts)](
        q, k_cache, v_cache, slots, seq_lens, acc, lse, out, tables, counters,
        prefix.lens if prefix is not None else seq_lens,
        q.stride(0), q.stride(1), *strides,
        *a_strides, *l_strides,
        out.stride(0), out.stride(1),
        scale * LOG2E, partition_size, pre_size, pre_parts,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=block_n, SINGLE=single, DOT_PRECISION=dot,
        PAGED=paged, BLOCK_SIZE=block_size,
        BLOCK_S=triton.next_power_of_2(pre_parts + num_parts), CASCADE=prefix is not None,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def prefix_partition_size(
    batch: int, group: int, num_kv_heads: int, max_length: int, block_n: int, sms: int
) -> int:
    """Prefix tokens per `_prefix_kernel` program: about two programs per SM over the row tiles
    and KV heads, at least 256 tokens each and at most 64 partitions."""
    tiles = max(1, math.ceil(batch * group / 64)) * num_kv_heads
    want = max(1, math.ceil(2 * sms / tiles))
    size = max(math.ceil(max(1, max_length) / want), 256, math.ceil(max(1, max_length) / 64))
    return math.ceil(size / block_n) * block_n


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """At least `size` int32 merge counters at 0 for a call on `device`: the device's newest
    buffer (the kernel leaves it at 0), made outside CUDA-graph capture so graphs and eager
    calls share it. A larger one replaces it when needed, but every buffer stays allocated for
    the life of the process: a captured graph keeps the address it was captured with and holds
    no reference to the tensor. While a stream captures and the buffer is too small, a fresh
    zeroed one from the graph's pool (its zeroing is part of the graph, so every replay starts
    at 0)."""
    bufs = _COUNTERS.setdefault(device, [])
    if bufs and bufs[-1].numel() >= size:
        return bufs[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    bufs.append(torch.zeros(max(size, 4096), dtype=torch.int32, device=device))
    return bufs[-1]
