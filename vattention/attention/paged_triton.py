"""`paged_triton`: the PagedAttention baseline's Triton kernels as an attention backend.

- decode rows (one new token) go to the split-K decode kernel written for both caches
  (`decode_kernels.decode_attention`) in its block-table mode, in one launch;
- prefill rows (fresh prompts and chunks continuing a cached context) go to the causal prefill
  kernel written for both caches (`prefill_kernels.prefill_attention`) in its block-table mode,
  in one launch, reading every key through the tables;
- a decode-only batch uses the metadata's device tensors only (no host work, no plan): this is
  the path CUDA graphs capture. Mixed batches build their index tensors once per step.
Runs on CUDA, or on the CPU under the Triton interpreter (`TRITON_INTERPRET=1`, small shapes).
Launch knobs are constructor options so that a benchmark can tune them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vattention.attention.base import AttentionMetadata, KVCacheView, register_backend
from vattention.attention.paged_base import PagedBackend
from vattention.attention.triton_decode import triton_usable


@dataclass(frozen=True)
class _MixedPlan:
    """Index tensors of a batch with prefill rows (built once per step, on the device)."""

    decode_rows: torch.Tensor | None  # [Bd] int64 rows of q holding decode tokens
    decode_tables: torch.Tensor | None  # [Bd, W] their block tables
    decode_seq_lens: torch.Tensor | None  # [Bd] their lengths
    decode_max_len: int
    tile_req: torch.Tensor  # [tiles] int32
    tile_row: torch.Tensor  # [tiles] int32


@register_backend
class PagedTritonBackend(PagedBackend):
    """Split-K paged decode plus a paged causal prefill kernel, both in Triton."""

    name = "paged_triton"
    supports_decode_graphs = True
    supports_cascade = True

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        *,
        partition_size: int | None = None,
        decode_block_n: int | None = None,
        decode_num_warps: int = 4,
        decode_num_stages: int = 2,
        prefill_config: tuple[int, int, int, int] | None = None,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        reason = triton_usable(self.device)
        if reason is not None:
            raise ValueError(f"paged_triton unavailable: {reason}")
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"paged_triton needs a power-of-two head_dim >= 16, got {head_dim}")
        from vattention.attention.prefill_kernels import default_prefill_config

        self.partition_size = partition_size
        self.decode_block_n = decode_block_n
        self.decode_num_warps = decode_num_warps
        self.decode_num_stages = decode_num_stages
        self.prefill_config = prefill_config or default_prefill_config(head_dim, self.device)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tables = self.check_step(q, meta)
        k_pool, v_pool = self.layer_kv(layer)
        if meta.is_decode_only:
            return self._decode(
                q, k_pool, v_pool, tables, meta.seq_lens, meta.max_seq_len, meta.prefix
            )
        from vattention.attention.prefill_kernels import prefill_attention

        plan = self.plan(meta, "mixed", lambda: self._mixed_plan(meta, tables))
        out = torch.empty_like(q)
        block_m, block_n, warps, stages = self.prefill_config
        prefill_attention(
            q, k_pool, v_pool, meta.query_start_loc, meta.seq_lens,
            plan.tile_req, plan.tile_row, self.scale, out, block_tables=tables,
            block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        if plan.decode_rows is not None:
            assert plan.decode_tables is not None and plan.decode_seq_lens is not None
            out[plan.decode_rows] = self._decode(
                q[plan.decode_rows],
                k_pool,
                v_pool,
                plan.decode_tables,
                plan.decode_seq_lens,
                plan.decode_max_len,
            )
        return out

    def _decode(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        tables: torch.Tensor,
        seq_lens: torch.Tensor,
        max_len: int,
        prefix: Any = None,
    ) -> torch.Tensor:
        """`prefix` (a `SharedPrefix` whose leader is a row of `tables`): whole batches only."""
        from vattention.attention.decode_kernels import decode_attention

        return decode_attention(
            q, k_pool, v_pool, seq_lens, seq_lens, self.scale, max_len,
            block_n=self.decode_block_n, num_warps=self.decode_num_warps,
            num_stages=self.decode_num_stages, block_tables=tables,
            partition_size=self.partition_size, prefix=prefix,
        )  # fmt: skip

    def _mixed_plan(self, meta: AttentionMetadata, tables: torch.Tensor) -> _MixedPlan:
        from vattention.attention.prefill_kernels import prefill_tiles

        q_lens, s_lens = meta.query_lens_host, meta.seq_lens_host
        starts = self.query_starts(meta)
        decode = [i for i, n in enumerate(q_lens) if n == 1]
        prefill = [i for i, n in enumerate(q_lens) if n > 1]
        req, row = prefill_tiles(prefill, q_lens, s_lens, self.prefill_config[0])
        dev = self.device

        def tensor(xs: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(xs, dtype=dtype).to(dev, non_blocking=True)

        reqs = tensor(decode, torch.int64) if decode else None
        return _MixedPlan(
            decode_rows=tensor([starts[i] for i in decode], torch.int64) if decode else None,
            decode_tables=None if reqs is None else tables[reqs],
            decode_seq_lens=None if reqs is None else meta.seq_lens[reqs],
            decode_max_len=max((s_lens[i] for i in decode), default=1),
            tile_req=tensor(req, torch.int32),
            tile_row=tensor(row, torch.int32),
        )
