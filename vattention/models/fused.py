"""Fused Triton kernels for the model's elementwise work on CUDA (one pass instead of several).

- `rope_qkv(qkv, cos_sin, positions, ...)`: splits the fused QKV projection output and applies
  rotate-half RoPE to q and k in one launch, writing contiguous q `[T, Hq, D]` and k `[T, Hkv, D]`
  (v is returned as a view). Rotation runs in float32 from the float32 cos/sin cache.
- `silu_and_mul(x)`: `[T, 2I]` laid out `[gate | up]` -> `silu(gate) * up`, one read, one write.
- `add_rms_norm(x, residual, weight, eps)`: the residual add and the RMSNorm after it in one
  pass: `s = x + residual` (rounded to the input dtype, as torch's add rounds) and
  `rms_norm(s) * weight` (float32 statistics, one rounding, as `F.rms_norm` on CUDA).
The torch versions in `layers.py`/`rope.py` stay the reference (CPU, and the tests compare both).
Invariant: both kernels read only their inputs' valid rows and write every output element once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    QKV, CosSin, Pos, Q, K,
    stride_qkv, stride_cs,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    cos = tl.load(CosSin + pos * stride_cs + offs_d)[None, :]
    sin = tl.load(CosSin + pos * stride_cs + HALF + offs_d)[None, :]
    h_mask = (offs_h < HQ + HKV)[:, None]
    src = QKV + t * stride_qkv + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    x1 = tl.load(src, mask=h_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=h_mask, other=0.0).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(Q.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(Q.dtype.element_ty)
    is_q = (offs_h < HQ)[:, None]
    q_dst = Q + (t * HQ + offs_h[:, None]) * (2 * HALF) + offs_d[None, :]
    tl.store(q_dst, o1, mask=is_q)
    tl.store(q_dst + HALF, o2, mask=is_q)
    is_k = h_mask & ~is_q
    k_dst = K + (t * HKV + offs_h[:, None] - HQ) * (2 * HALF) + offs_d[None, :]
    tl.store(k_dst, o1, mask=is_k)
    tl.store(k_dst + HALF, o2, mask=is_k)


def rope_qkv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (rotated, contiguous) and v (a view) from `qkv [T, (Hq + 2 Hkv) * D]`."""
    t = qkv.shape[0]
    if qkv.stride(-1) != 1 or head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError("rope_qkv needs a contiguous last dim and a power-of-two head_dim")
    q = torch.empty(t, num_heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    k = torch.empty(t, num_kv_heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    if t:
        _rope_kernel[(t,)](
            qkv, cos_sin, positions, q, k, qkv.stride(0), cos_sin.stride(0),
            HQ=num_heads, HKV=num_kv_heads, HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(num_heads + num_kv_heads),
        )  # fmt: skip
    v_start = (num_heads + num_kv_heads) * head_dim
    v = qkv[:, v_start : v_start + num_kv_heads * head_dim].view(t, num_kv_heads, head_dim)
    return q, k, v


@triton.jit
def _silu_mul_kernel(X, Out, stride_x, stride_o, INTER, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(X + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + t * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(Out + t * stride_o + offs, out.to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    t, two_i = x.shape
    inter = two_i // 2
    out = torch.empty(t, inter, device=x.device, dtype=x.dtype)
    if t:
        block = 1024
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block
        )
    return out


@triton.jit
def _add_rms_norm_kernel(
    X, R, W, Out, Sum, stride_x, stride_r, stride_o, stride_s, N, eps, BLOCK: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + t * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(Sum.dtype.element_ty)  # the rounding torch's add makes
    tl.store(Sum + t * stride_s + offs, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / N + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_o + offs, (sf * rstd * w).to(Out.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rms_norm(x + residual) * weight`, `x + residual`) for `[T, N]` rows, one launch."""
    if x.shape != residual.shape or x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(
            f"add_rms_norm: x {tuple(x.shape)}, residual {tuple(residual.shape)} and weight "
            f"{tuple(weight.shape)} do not match ([T, N], [T, N], [N])"
        )
    if x.stride(-1) != 1 or residual.stride(-1) != 1:
        raise ValueError("add_rms_norm needs contiguous rows")
    t, n = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x)
    if t:
        block = triton.next_power_of_2(n)
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        _add_rms_norm_kernel[(t,)](
            x, residual, weight, out, summed, x.stride(0), residual.stride(0), out.stride(0),
            summed.stride(0), n, eps, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return out, summed
