"""One-pass merge of two partial attentions by their log-sum-exps (Triton).

`merge_into(o1, l1, o2, l2, out)` writes `out = o2 + (o1 - o2) * w1`, `w1 = e^l1 / (e^l1 + e^l2)`
(computed from `max(l1, l2)`, so no overflow), for outputs `[B, H, n, D]` (any strides, the last
dimension unit-stride: `out` may be a transposed view of a `[tokens, H, D]` buffer) and
log-sum-exps `[B, H, n]` in float32. One read of each partial, one write, float32 in between:
the same algebra as `split_chunk.merge_lse`'s torch form, which takes five passes over a float32
copy. Grid `(cdiv(n, BLOCK_N), H, B)`; offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    O1, L1, O2, L2, Out, n,
    s_o1b, s_o1h, s_o1n, s_o2b, s_o2h, s_o2n,
    s_l1b, s_l1h, s_l1n, s_l2b, s_l2h, s_l2n,
    s_ob, s_oh, s_on,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n
    mask = mask_n[:, None] & (offs_d[None, :] < HEAD_DIM)
    l1 = tl.load(L1 + b * s_l1b + h * s_l1h + offs_n * s_l1n, mask=mask_n, other=0.0)
    l2 = tl.load(L2 + b * s_l2b + h * s_l2h + offs_n * s_l2n, mask=mask_n, other=0.0)
    m = tl.maximum(l1, l2)
    e1 = tl.exp(l1 - m)
    w1 = e1 / (e1 + tl.exp(l2 - m))
    p1 = O1 + b * s_o1b + h * s_o1h + offs_n[:, None] * s_o1n + offs_d[None, :]
    p2 = O2 + b * s_o2b + h * s_o2h + offs_n[:, None] * s_o2n + offs_d[None, :]
    o1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    res = o2 + (o1 - o2) * w1[:, None]
    po = Out + b * s_ob + h * s_oh + offs_n[:, None] * s_on + offs_d[None, :]
    tl.store(po, res.to(Out.dtype.element_ty), mask=mask)


def merge_into(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Write the merge of `(o1, l1)` and `(o2, l2)` into `out` (all `[B, H, n, D]` with a
    unit-stride last dimension; `l1`, `l2` float32 `[B, H, n]`); returns `out`."""
    batch, heads, n, d = out.shape
    for t in (o1, o2, out):
        if t.shape != out.shape or t.stride(-1) != 1:
            raise ValueError(f"merge needs [B, H, n, D] tensors with unit-stride D, got {t.shape}")
    block_n = 64
    grid = (triton.cdiv(n, block_n), heads, batch)
    _merge_kernel[grid](
        o1, l1, o2, l2, out, n,
        *o1.stride()[:3], *o2.stride()[:3], *l1.stride(), *l2.stride(), *out.stride()[:3],
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
    )  # fmt: skip
    return out
