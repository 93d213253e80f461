"""`fa2_varlen`: torch's bundled FlashAttention-2 in varlen mode, reading the cache in place.

The per-layer cache `[slots, max_len, kv_heads, head_dim]` is seen as one flat sequence of token
rows `[slots * R, kv_heads, head_dim]` with row stride `stride(1)`, where `R = stride(0) /
stride(1)` rows separate two slots (`R >= max_len`: slots may be padded to whole pages; with the
cross-layer layout the row stride spans all layers). Request i then starts at row `slot_i * R`
(`cum_seq_k[i]`) and `seqused_k[i] = seq_len_i` rows of it are used: the kernel predicates its
loads on `seqused_k`, so rows past a request's length (possibly unbacked) are never read.
FlashAttention aligns the causal mask bottom-right, which handles decode, fresh and chunked
prefill in one launch. When the slot stride is not a whole number of rows the flat view does
not exist, and each request gets its own launch over its slot view instead.
CUDA only, fp16/bf16, head_dim <= 256 and a multiple of 8.
"""

from __future__ import annotations

import torch

from vattention.attention.base import AttentionMetadata, KVCacheView, register_backend
from vattention.attention.contiguous import ContiguousBackend


def flat_rows(cache: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """`(cache as [slots * R, H, D] rows, R)`, or None if the slot stride is not whole rows."""
    slot_stride, row_stride = cache.stride(0), cache.stride(1)
    if slot_stride % row_stride:
        return None
    rows_per_slot = slot_stride // row_stride
    shape = (cache.shape[0] * rows_per_slot, cache.shape[2], cache.shape[3])
    strides = (row_stride, cache.stride(2), 1)
    return cache.as_strided(shape, strides, cache.storage_offset()), rows_per_slot


def flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cum_seq_q: torch.Tensor,
    cum_seq_k: torch.Tensor,
    seqused_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
) -> torch.Tensor:
    """One `aten._flash_attention_forward` varlen call (causal, bottom-right); returns `[T, H, D]`."""
    out = torch.ops.aten._flash_attention_forward(
        q,
        k,
        v,
        cum_seq_q,
        cum_seq_k,
        max_q,
        max_k,
        0.0,  # dropout_p
        True,  # is_causal
        False,  # return_debug_mask
        scale=scale,
        seqused_k=seqused_k,
    )
    return out[0]


def per_request_offsets(
    meta: AttentionMetadata,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per request: (cum_seq_q `[0, n]`, cum_seq_k `[0, seq_len]`, seqused_k `[seq_len]`)."""
    rows = [[0, n, 0, s, s] for n, s in zip(meta.query_lens_host, meta.seq_lens_host, strict=True)]
    # One copy per step, queued without waiting for the GPU.
    table = torch.tensor(rows, dtype=torch.int32).to(meta.slots.device, non_blocking=True)
    return [(r[0:2], r[2:4], r[4:5]) for r in table]


def slot_offsets(slots: torch.Tensor, rows_per_slot: int, total_rows: int) -> torch.Tensor:
    """`cum_seq_k` of a flat view: request i starts at row `slots[i] * rows_per_slot`; the last
    entry is the view's end (int32, on the device, no host sync)."""
    starts = slots.to(torch.int64) * rows_per_slot
    end = torch.full((1,), total_rows, dtype=torch.int64, device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)


@register_backend
class FlashVarlenBackend(ContiguousBackend):
    """FA2 varlen over the whole batch in one launch (per request if slots are not whole rows)."""

    name = "fa2_varlen"

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        if self.device.type != "cuda":
            raise ValueError(f"fa2_varlen needs a CUDA cache, this one is on {self.device}")
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"fa2_varlen needs a float16 or bfloat16 cache, got {self.dtype}")
        if head_dim > 256 or head_dim % 8:
            raise ValueError(
                f"fa2_varlen needs head_dim <= 256 and a multiple of 8, got {head_dim}"
            )

    @property
    def supports_decode_graphs(self) -> bool:
        """The one-launch path reads device tensors only; the per-request one (no flat view)
        reads the host lists."""
        k_flat, v_flat = flat_rows(self.cache.k_cache(0)), flat_rows(self.cache.v_cache(0))
        return k_flat is not None and v_flat is not None and k_flat[1] == v_flat[1]

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.check_q(q, meta)
        k_cache, v_cache = self.layer_kv(layer)
        k_flat, v_flat = flat_rows(k_cache), flat_rows(v_cache)
        if k_flat is None or v_flat is None or k_flat[1] != v_flat[1]:
            return self._attend_per_request(q, k_cache, v_cache, meta)
        rows_per_slot, total = k_flat[1], k_flat[0].shape[0]
        cum_seq_k = self.plan(
            meta,
            ("cum_seq_k", rows_per_slot),
            lambda: slot_offsets(meta.slots, rows_per_slot, total),
        )
        return flash_varlen(
            q,
            k_flat[0],
            v_flat[0],
            meta.query_start_loc,
            cum_seq_k,
            meta.seq_lens,
            meta.max_query_len,
            meta.max_seq_len,
            self.scale,
        )

    def _attend_per_request(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        starts = self.starts(meta)
        offsets = self.plan(meta, "per_request_offsets", lambda: per_request_offsets(meta))
        for i in range(meta.num_seqs):
            slot, seq_len = meta.slots_host[i], meta.seq_lens_host[i]
            a, b = starts[i], starts[i + 1]
            cu_q, cu_k, used_k = offsets[i]
            out[a:b] = flash_varlen(
                q[a:b], k_cache[slot], v_cache[slot], cu_q, cu_k, used_k, b - a, seq_len, self.scale
            )
        return out
