"""`sdpa`: `F.scaled_dot_product_attention` (GQA-native) reading slot views of the cache in place.

- A uniform batch (equal lengths, consecutive slots; see `contiguous.Uniform`) is one call over
  the dense view `cache[first:first + B, :seq_len].transpose(1, 2)`: the gpt-fast contract.
- Otherwise one call per request over `cache[slot:slot + 1, :seq_len].transpose(1, 2)`.
- On CUDA, prefills prefer the cuDNN kernel (fresh prompts, `is_causal`), and chunked prefills
  use `causal_lower_right` (flash); torch falls back to the next usable kernel by itself.
Only rows `[0, seq_len)` of each slot are read, so unbacked rows are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from vattention.attention.base import AttentionMetadata, register_backend
from vattention.attention.contiguous import (
    ContiguousBackend,
    Uniform,
    causal_bool_mask,
    uniform_batch,
)

# Prompts (or chunks) take cuDNN only with at least this many new tokens and this much work
# (new tokens x context tokens): cuDNN builds a graph per new (query, key) shape, whose host
# cost only long requests over long contexts repay (`auto`, `pa_triton`). On the H200
# (2026-12-02) fresh 4K-7K prompts through cuDNN made a llama-3-8b long-prompt trace 19%
# slower than our Triton kernel (14.74 vs 12.42 s, host 18.4 vs 8.3 ms a step), while 8K
# chunks over 20K-62K contexts gained (1.13x the paged baseline, against 0.95x by FA2).
# 8K x 8K (since 2026-12-03; 8K x 32K before): a long prompt's 8K chunks all go to cuDNN
# (their shapes recur: chunk and context are multiples of the step budget), fresh prompts
# under 8K stay on Triton.
CUDNN_MIN_TOKENS = 4096
CUDNN_MIN_WORK = 8192 * 8192


def takes_cudnn(new_tokens: int, seq_len: int, min_tokens: int, min_work: int) -> bool:
    """Whether a request of `new_tokens` (> 1) ending at `seq_len` goes to cuDNN
    (`min_tokens` 0: never; `min_work` 0: on new tokens alone)."""
    return bool(min_tokens) and new_tokens >= min_tokens and new_tokens * seq_len >= min_work


_PREFILL_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@contextlib.contextmanager
def prefer_cudnn(enabled: bool) -> Iterator[None]:
    """Make cuDNN the first choice of SDPA inside the block (no-op when `enabled` is False)."""
    if not enabled:
        yield
        return
    ctx: contextlib.AbstractContextManager[object]
    try:
        ctx = sdpa_kernel(_PREFILL_ORDER, set_priority=True)
    except TypeError:  # torch without set_priority: keep its default order
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def sdpa_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, context_len: int
) -> torch.Tensor:
    """SDPA on `[B, H, n, D]` queries over `[B, Hkv, S, D]` keys, query j at `context_len + j`."""
    n, seq_len = q.shape[2], k.shape[2]
    mask: object = None
    if n > 1 and context_len > 0:
        fused = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
        mask = causal_lower_right(n, seq_len) if fused else causal_bool_mask(n, seq_len, q.device)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,  # type: ignore[arg-type]
        is_causal=n > 1 and context_len == 0,
        scale=scale,
        enable_gqa=True,
    )


def sdpa_requests(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    starts: list[int],
    requests: Iterable[int],
    scale: float,
    out: torch.Tensor,
    attend: Callable[..., torch.Tensor] | None = None,
) -> None:
    """Fill `out`'s rows of each request in `requests`: one call over its slot view
    (`[1, H, n, D]` queries, `[1, Hkv, seq_len, D]` keys and values): `sdpa_causal`, or
    `attend(q, k, v, scale, o)` when given, which writes `o` (the request's rows of `out` as a
    `[1, H, n, D]` view)."""
    for i in requests:
        slot, seq_len = meta.slots_host[i], meta.seq_lens_host[i]
        a, b = starts[i], starts[i + 1]
        qi = q[a:b].transpose(0, 1).unsqueeze(0)
        ki = k_cache[slot : slot + 1, :seq_len].transpose(1, 2)
        vi = v_cache[slot : slot + 1, :seq_len].transpose(1, 2)
        if attend is None:
            o = sdpa_causal(qi, ki, vi, scale, seq_len - (b - a))
            out[a:b] = o.squeeze(0).transpose(0, 1)
        else:
            attend(qi, ki, vi, scale, out[a:b].transpose(0, 1).unsqueeze(0))


@register_backend
class SDPABackend(ContiguousBackend):
    """Torch SDPA over the contiguous cache: one call per uniform batch or per request."""

    name = "sdpa"

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.check_q(q, meta)
        k_cache, v_cache = self.layer_kv(layer)
        uniform = self.plan(meta, "uniform", lambda: uniform_batch(meta))
        with prefer_cudnn(q.is_cuda and meta.max_query_len > 1):
            if uniform is not None:
                return self._attend_uniform(q, k_cache, v_cache, uniform)
            out = torch.empty_like(q)
            starts = self.starts(meta)
            sdpa_requests(q, k_cache, v_cache, meta, starts, range(meta.num_seqs), self.scale, out)
            return out

    def _attend_uniform(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, u: Uniform
    ) -> torch.Tensor:
        rows = slice(u.first_slot, u.first_slot + u.num_seqs)
        qb = q.view(u.num_seqs, u.query_len, self.num_heads, self.head_dim).transpose(1, 2)
        o = sdpa_causal(
            qb,
            k_cache[rows, : u.seq_len].transpose(1, 2),
            v_cache[rows, : u.seq_len].transpose(1, 2),
            self.scale,
            u.context_len,
        )
        return o.transpose(1, 2).reshape(q.shape)
