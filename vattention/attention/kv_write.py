"""Writing a step's new K and V rows into the cache: one Triton launch for both tensors.

`write_rows(k, v, k_cache, v_cache, index0, index1=None, block_size=0)` stores token t's
`[kv_heads, head_dim]` rows of `k` and `v` at
- the contiguous cache (`index1` given): `cache[index0[t], index1[t]]` (slot, position), over
  per-layer tensors or strided cross-layer views alike;
- a paged pool (`block_size` > 0): `pool[index0[t] // block_size, index0[t] % block_size]`.
Both sides of the comparison share this kernel. It replaces two `index_put_` / `index_copy_`
launches (K, then V) with one; it reads indices from device tensors only (CUDA-graph safe),
uses 64-bit offsets (a virtual cache can exceed 2^31 elements) and needs unit-stride rows
(`head_dim` contiguous); `usable` says when it applies, else callers keep the torch ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kernel(
    K, V, KC, VC, Idx0, Idx1,
    s_kt, s_kh, s_vt, s_vh,
    s_kc0, s_kc1, s_kch, s_vc0, s_vc1, s_vch, block_size,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    if PAGED:
        m = tl.load(Idx0 + t).to(tl.int64)
        a = m // block_size
        b = m % block_size
    else:
        a = tl.load(Idx0 + t).to(tl.int64)
        b = tl.load(Idx1 + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < HEADS) & (offs_d < HEAD_DIM)
    k = tl.load(K + t * s_kt + offs_h * s_kh + offs_d, mask=mask)
    tl.store(KC + a * s_kc0 + b * s_kc1 + offs_h * s_kch + offs_d, k.to(KC.dtype.element_ty),
             mask=mask)  # fmt: skip
    v = tl.load(V + t * s_vt + offs_h * s_vh + offs_d, mask=mask)
    tl.store(VC + a * s_vc0 + b * s_vc1 + offs_h * s_vch + offs_d, v.to(VC.dtype.element_ty),
             mask=mask)  # fmt: skip


def writer_for(*tensors: torch.Tensor) -> Callable[..., None] | None:
    """`write_rows` if it applies to these tensors (`usable`), else None."""
    return write_rows if usable(*tensors) else None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether backends use `write_rows`: on CUDA, every tensor's last dimension unit-stride.
    (On the CPU torch's index ops are faster than the Triton interpreter; tests call
    `write_rows` there directly.)"""
    return tensors[0].device.type == "cuda" and all(t.stride(-1) == 1 for t in tensors)


def write_rows(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index0: torch.Tensor,
    index1: torch.Tensor | None = None,
    block_size: int = 0,
) -> None:
    """Store `k`, `v` (`[tokens, kv_heads, head_dim]`) into the cache (see the module doc)."""
    tokens, heads, dim = k.shape
    if tokens == 0:
        return
    paged = index1 is None
    if paged and block_size <= 0:
        raise ValueError("a paged write needs block_size > 0")
    _write_kernel[(tokens,)](
        k, v, k_cache, v_cache, index0, index0 if paged else index1,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), max(block_size, 1),
        HEADS=heads, HEAD_DIM=dim, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim), PAGED=paged,
    )  # fmt: skip
