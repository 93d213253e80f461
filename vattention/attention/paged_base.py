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

import torch

from vattention.attention.base import AttentionBackend, AttentionMetadata, KVCacheView


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

    # -- shared helpers -----------------------------------------------------------------------
    def check_step(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Validate q and the paged metadata; returns `meta.block_tables`."""
        self.check_q_common(q, meta)
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

    # -- AttentionBackend ---------------------------------------------------------------------
    def write_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Scatter the new tokens to `pool[slot_mapping // bs, slot_mapping % bs]`."""
        self.check_new_kv(k, v, meta)
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
