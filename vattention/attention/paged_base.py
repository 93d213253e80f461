"""The shared part of the paged backends (PagedAttention baseline): pool checks, K/V writes,
per-step plans and the gather path.

A paged cache gives, per layer, K and V pools `[num_blocks, block_size, kv_heads, head_dim]`
(any strides with a contiguous head_dim); `meta.block_tables[i]` lists request i's blocks in
order (padded with block 0) and `meta.slot_mapping` holds `block * block_size + offset` for
every new token. Invariant kept by every paged backend: only the first `seq_lens[i]` tokens of
request i's table are read, and only the new tokens' rows are written; one exception,
`paged_flex` also zeroes the rows past each request's length in its last block (rows no request
reads as context), because its compiled kernel multiplies them by zero weights (0 * NaN = NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from vattention.attention.base import AttentionBackend, AttentionMetadata, KVCacheView

T = TypeVar("T")


def check_pool(pool: torch.Tensor, num_kv_heads: int, head_dim: int, what: str) -> None:
    """A paged pool must be `[blocks, block_size, kv_heads, head_dim]` with stride(-1) == 1."""
    if pool.dim() != 4 or pool.shape[2] != num_kv_heads or pool.shape[3] != head_dim:
        raise ValueError(
            f"{what} must be [num_blocks, block_size, {num_kv_heads}, {head_dim}] "
            f"(a paged cache), got {tuple(pool.shape)}"
        )
    if pool.stride(-1) != 1:
        raise ValueError(f"{what} needs a contiguous head_dim, got strides {pool.stride()}")


class PagedBackend(AttentionBackend):
    """Base of the paged backends: checks, slot-mapping writes, plan caching, gathers."""

    paged = True

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        pool = cache.k_cache(0)
        check_pool(pool, num_kv_heads, head_dim, "k_cache(0)")
        self.block_size = int(pool.shape[1])
        self.num_blocks = int(pool.shape[0])
        self.device = pool.device
        self.dtype = pool.dtype
        self._plan_meta: AttentionMetadata | None = None
        self._plan_capturing = False
        self._plans: dict[Any, Any] = {}

    # -- shared helpers -----------------------------------------------------------------------
    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k_cache(layer), self.cache.v_cache(layer)

    def plan(self, meta: AttentionMetadata, key: Any, build: Callable[[], T]) -> T:
        """`build()` once per (step metadata object, key); later layers reuse the value.

        A CUDA-graph capture rebuilds it once even for a metadata object seen in the warm-up,
        so that device work done by `build` is recorded in the graph and redone at replay."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if meta is not self._plan_meta or capturing != self._plan_capturing:
            self._plan_meta = meta
            self._plan_capturing = capturing
            self._plans = {}
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]  # type: ignore[no-any-return]

    def check_step(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Validate q and the paged metadata; returns `meta.block_tables`."""
        expected = (meta.num_tokens, self.num_heads, self.head_dim)
        if tuple(q.shape) != expected:
            raise ValueError(
                f"q must be [tokens, heads, head_dim] = {expected}, got {tuple(q.shape)}"
            )
        if q.dtype != self.dtype:
            raise TypeError(f"q dtype {q.dtype} differs from the cache dtype {self.dtype}")
        if q.device != self.device:
            raise ValueError(f"q is on {q.device} but the cache is on {self.device}")
        tables = meta.block_tables
        if tables is None or meta.block_size != self.block_size:
            raise ValueError(
                f"{self.name} needs metadata built with block_tables and block_size="
                f"{self.block_size} (got block_size={meta.block_size}, "
                f"tables={'none' if tables is None else tuple(tables.shape)})"
            )
        if tables.shape[1] * self.block_size < meta.max_seq_len:
            raise ValueError(
                f"block tables of width {tables.shape[1]} hold {tables.shape[1] * self.block_size}"
                f" tokens < max_seq_len {meta.max_seq_len}"
            )
        return tables

    def query_starts(self, meta: AttentionMetadata) -> list[int]:
        """Host copy of `meta.query_start_loc` (built once per step)."""

        def build() -> list[int]:
            starts = [0]
            for n in meta.query_lens_host:
                starts.append(starts[-1] + n)
            return starts

        return self.plan(meta, "query_starts", build)

    # -- AttentionBackend ---------------------------------------------------------------------
    def write_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Scatter the new tokens to `pool[slot_mapping // bs, slot_mapping % bs]`."""
        expected = (meta.num_tokens, self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(
                f"k and v must be [tokens, kv_heads, head_dim] = {expected}, "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        mapping = meta.slot_mapping
        if mapping is None:
            raise ValueError(f"{self.name} needs metadata built with block_tables (slot_mapping)")
        k_pool, v_pool = self.layer_kv(layer)
        write = self.row_writer(k, v, k_pool, v_pool)
        if write:  # one launch for both (the kernel the contiguous side uses)
            write(k, v, k_pool, v_pool, mapping, block_size=self.block_size)
            return
        for pool, new in zip((k_pool, v_pool), (k, v), strict=True):
            new = new.to(pool.dtype)
            if pool.is_contiguous():
                pool.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, mapping, new)
            else:
                index = self.plan(
                    meta,
                    "block_offset",
                    lambda: (mapping // self.block_size, mapping % self.block_size),
                )
                pool.index_put_(index, new)

    def gather(
        self, layer: int, meta: AttentionMetadata, i: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Request i's first `seq_len` tokens of K and V as dense copies `[seq_len, Hkv, D]`."""
        assert meta.block_tables is not None  # checked by check_step
        n = meta.seq_lens_host[i]
        blocks = meta.block_tables[i, : -(-n // self.block_size)].long()
        h, d = self.num_kv_heads, self.head_dim
        k_pool, v_pool = self.layer_kv(layer)
        k = k_pool.index_select(0, blocks).reshape(-1, h, d)[:n]
        v = v_pool.index_select(0, blocks).reshape(-1, h, d)[:n]
        return k, v
