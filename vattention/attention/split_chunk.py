"""A prefill chunk over a cached context as two fresh-prompt attention calls merged by LSE.

A chunk of `n` new queries at positions `[c, c + n)` attends to keys `[0, c + n)` under a
bottom-right causal mask. The fastest prefill kernel on Hopper that torch ships (cuDNN, through
SDPA) is only fast on the shapes a fresh prompt has; with a bottom-right mask it runs slower
than FlashAttention-2. So the chunk is cut in two calls whose shapes it handles well:
- the context part: every query against keys `[0, c)`, no mask (all of them precede the chunk);
- the chunk part: the queries against keys `[c, c + n)`, plain causal (a fresh prompt's shape);
and the two partial outputs are merged with their log-sum-exps `l1`, `l2`:
`out = o1 * exp(l1 - l) + o2 * exp(l2 - l)`, `l = logaddexp(l1, l2)` (exact softmax algebra).
Both calls read the slot's rows of the contiguous cache in place (strided views, GQA-native):
this has no paged form, since cuDNN's kernel cannot follow a block table.

`attend_lse` is the primitive: cuDNN on CUDA (`aten._scaled_dot_product_cudnn_attention` with
`compute_log_sumexp`), a float32 reference elsewhere (tests). `cudnn_lse_usable` probes once per
device whether this torch build runs it with GQA views, so callers can fall back.
"""

from __future__ import annotations

import functools

import torch


def _attend_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 attention of `[B, H, n, D]` over `[B, Hkv, S, D]`: (out in q's dtype, lse)."""
    rep = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    if causal:  # square, top-left aligned: query j sees keys [0, j]
        n, s = scores.shape[-2:]
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ vf).to(q.dtype), lse


def attend_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `q [B, H, n, D]` over `k, v [B, Hkv, S, D]` (`causal`: square, n == S):
    (out `[B, H, n, D]`, natural-log log-sum-exp of the scaled scores `[B, H, n]`, float32)."""
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return res[0], res[1].reshape(q.shape[:3]).float()
    return _attend_lse_reference(q, k, v, scale, causal)


def _fused_merge_usable(t: torch.Tensor) -> bool:
    """On CUDA with Triton (tests call `lse_merge` directly under the CPU interpreter)."""
    if not t.is_cuda or t.stride(-1) != 1:
        return False
    from vattention.attention.triton_decode import triton_usable

    return triton_usable(t.device) is None


def merge_lse(
    o1: torch.Tensor,
    l1: torch.Tensor,
    o2: torch.Tensor,
    l2: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax-exact merge of two partial attentions over disjoint key sets (`[B, H, n, D]`
    outputs, `[B, H, n]` log-sum-exps), in the outputs' dtype, written into `out` when given
    (any `[B, H, n, D]` view). On CUDA one Triton pass (`lse_merge`); else in torch."""
    if out is None:
        out = torch.empty_like(o1)
    if all(_fused_merge_usable(t) for t in (o1, o2, out)):
        from vattention.attention.lse_merge import merge_into

        return merge_into(o1, l1.float(), o2, l2.float(), out)
    # w1 + w2 = 1, so out = o2 + (o1 - o2) * w1: one float32 buffer of the output's size.
    w1 = torch.exp(l1 - torch.logaddexp(l1, l2)).unsqueeze(-1)
    return out.copy_(o1.float().sub_(o2).mul_(w1).add_(o2))


def split_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`q [B, H, n, D]` at positions `[S - n, S)` over `k, v [B, Hkv, S, D]`, bottom-right
    causal, as a context call plus a causal call merged by LSE (into `out` when given: a
    `[B, H, n, D]` view, e.g. of the step's output rows). Needs `0 < n < S`."""
    n, s = q.shape[2], k.shape[2]
    if not 0 < n < s:
        raise ValueError(f"a chunk needs 0 < new tokens < keys, got {n} and {s}")
    c = s - n
    o1, l1 = attend_lse(q, k[:, :, :c], v[:, :, :c], scale, causal=False)
    o2, l2 = attend_lse(q, k[:, :, c:], v[:, :, c:], scale, causal=True)
    return merge_lse(o1, l1, o2, l2, out)


@functools.lru_cache(maxsize=8)
def cudnn_lse_usable(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int) -> bool:
    """Whether `attend_lse` runs on this CUDA device with GQA strided views and agrees with the
    reference (probed once on a small case; False on any error)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        d, n, c = 128, 128, 256
        q = torch.randn(1, heads, n, d, device=device, dtype=dtype, generator=gen)
        kv = torch.randn(2, 1, c + n, 2, kv_heads, d, device=device, dtype=dtype, generator=gen)
        k, v = kv[0][:, :, 0].transpose(1, 2), kv[1][:, :, 1].transpose(1, 2)  # strided views
        out = split_chunk_attention(q, k, v, d**-0.5).float()
        ref = reference_chunk(q, k, v, d**-0.5)
        return bool((out - ref).norm() / ref.norm() < 2e-2)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False


def reference_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Float32 bottom-right causal attention (the definition `split_chunk_attention` meets)."""
    rep = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    n, s = q.shape[2], k.shape[2]
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    mask = torch.ones(n, s, dtype=torch.bool, device=q.device).triu(s - n + 1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ vf
