"""The shared part of every contiguous-cache backend: K/V writes, input checks, batch grouping.

A contiguous cache gives, per layer, K and V as `[max_slots, max_seq_len, kv_heads, head_dim]`
views. The views may be strided (cross-layer layout: layers interleaved per token; slot strides
rounded up to whole pages), so code here and in the backends reads strides, never assumes
`contiguous()`. Invariant kept by every backend: only rows `[0, seq_len)` of a request's slot are
read (the rows beyond may be unbacked virtual memory, and touching them faults), and only the
new tokens' rows are written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattention.attention.base import AttentionBackend, AttentionMetadata, KVCacheView


@dataclass(frozen=True)
class Uniform:
    """A batch whose requests share context and query lengths and sit in consecutive slots.

    Such a batch reads as one dense `[B, max_len, kv_heads, head_dim]` slice of the cache (every
    row of `cache[first_slot:first_slot + B, :seq_len]` is backed), so it needs one kernel call.
    """

    first_slot: int
    num_seqs: int
    context_len: int
    query_len: int

    @property
    def seq_len(self) -> int:
        return self.context_len + self.query_len


def uniform_batch(meta: AttentionMetadata) -> Uniform | None:
    """The `Uniform` description of `meta`, or None when requests differ."""
    slots, q_lens, s_lens = meta.slots_host, meta.query_lens_host, meta.seq_lens_host
    first = slots[0]
    if any(s != first + i for i, s in enumerate(slots)):
        return None
    if any(q != q_lens[0] for q in q_lens) or any(s != s_lens[0] for s in s_lens):
        return None
    return Uniform(first, len(slots), s_lens[0] - q_lens[0], q_lens[0])


def check_cache_tensor(t: torch.Tensor, what: str) -> None:
    """A per-layer cache view must be 4-D with a contiguous last dimension."""
    if t.dim() != 4:
        raise ValueError(
            f"{what} must be [slots, max_seq_len, kv_heads, head_dim], got {tuple(t.shape)}"
        )
    if t.stride(-1) != 1:
        raise ValueError(f"{what} needs a contiguous head_dim (stride 1), got strides {t.stride()}")


class ContiguousBackend(AttentionBackend):
    """Base of the contiguous backends: in-place K/V writes and per-step plan caching.

    `plan(meta, key, build)` (`AttentionBackend`) memoises values derived from one step's metadata (device index
    tensors, block masks) so that they are built once per step, not once per layer.
    """

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        k = cache.k_cache(0)
        check_cache_tensor(k, "k_cache(0)")
        if k.shape[2] != num_kv_heads or k.shape[3] != head_dim:
            raise ValueError(
                f"cache holds {k.shape[2]} kv heads x {k.shape[3]} dims, backend was given "
                f"{num_kv_heads} x {head_dim}"
            )
        self.device = k.device
        self.dtype = k.dtype
        self.max_seq_len = k.shape[1]

    # -- shared helpers -----------------------------------------------------------------------
    def check_q(self, q: torch.Tensor, meta: AttentionMetadata) -> None:
        self.check_q_common(q, meta)
        if meta.max_seq_len > self.max_seq_len:
            raise ValueError(
                f"a request needs {meta.max_seq_len} tokens > max_seq_len {self.max_seq_len}"
            )

    def starts(self, meta: AttentionMetadata) -> list[int]:
        """Host copy of `meta.query_start_loc` (built once per step)."""
        return self.query_starts(meta)

    # -- AttentionBackend ---------------------------------------------------------------------
    def write_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """`cache[token_slots, token_positions] = k` (and v): one Triton launch for both
        (`kv_write`) where it runs, else one vectorised index_put per tensor."""
        self.check_new_kv(k, v, meta)
        k_cache, v_cache = self.layer_kv(layer)
        write = self.row_writer(k, v, k_cache, v_cache)
        if write:
            write(k, v, k_cache, v_cache, meta.token_slots, meta.token_positions)
            return
        index = (meta.token_slots, meta.token_positions)
        k_cache.index_put_(index, k.to(k_cache.dtype))
        v_cache.index_put_(index, v.to(v_cache.dtype))


def causal_bool_mask(query_len: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """`[query_len, seq_len]` mask, True where allowed (bottom-right aligned); None if all allowed."""
    if query_len == 1:
        return None
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device).unsqueeze(1)
    return torch.arange(seq_len, device=device).unsqueeze(0) <= q_pos
