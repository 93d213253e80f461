"""Attention backends for the PagedAttention baseline (`PagedKVCache`: block pools + tables).

- `pa_triton` (CUDA; CPU under the Triton interpreter): decode rows through the contiguous
  backends' own split-K kernel (`decode_kernels`) in its block-table mode, and continued prefill
  chunks (new rows over a cached context) through the causal prefill kernel written for both
  caches (`prefill_kernels`) in its block-table mode, all of a step's chunks in one launch, so
  the comparison measures the addressing and nothing else; fresh prompts (no cached context)
  through FA2 varlen on the new K/V directly (what vLLM does too: a fresh prompt needs nothing
  from the cache). Where FA2 does not apply (float32, or the CPU) fresh prompts join the
  prefill kernel's launch. Where Triton cannot run (the CPU without `TRITON_INTERPRET=1`, see
  `triton_decode.triton_usable`) every row falls back to gather-then-SDPA
  (`paged_torch.attend_gathered`), fresh prompts to per-request SDPA on the new K/V.
A mixed step captured in a CUDA graph carries a fixed-shape plan (`meta.mixed`): then decode rows
take the split-K kernel and every prefill row (fresh or not) the prefill kernel over
sentinel-padded tiles, reading only static buffers.
Writes go through `meta.slot_mapping` (`block * block_size + offset` per new token).
Invariant: only the first `seq_len` tokens of a request's table are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vattention.attention.base import AttentionMetadata, KVCacheView, register_backend
from vattention.attention.mixed import MixedPlan, h2d, plan_mixed
from vattention.attention.paged_base import PagedBackend
from vattention.attention.paged_torch import attend_gathered
from vattention.attention.torch_ref import attend_one
from vattention.attention.triton_decode import triton_usable


@dataclass(frozen=True)
class _Plan:
    """A mixed batch cut into fresh prompts (FA2 on the new K/V), decode rows and prefill-kernel
    tiles (`mixed`), or, where Triton cannot run, gathered requests; built once per step."""

    mixed: MixedPlan | None = None  # decode rows + tiles of the continued chunks (Triton)
    gathered: tuple[int, ...] = ()  # requests by gather-then-SDPA (where Triton cannot run)
    fresh_rows: torch.Tensor | None = None  # rows of the fresh prompts FA2 (or SDPA) takes
    fresh_cu: torch.Tensor | None = None
    fresh_max: int = 0


@register_backend
class PagedTritonBackend(PagedBackend):
    """Paged Triton decode and causal prefill kernels (block-table modes of the contiguous
    backends' kernels); FA2 varlen for fresh prompts."""

    name = "pa_triton"

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        *,
        prefill_config: tuple[int, int, int, int] | None = None,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        from vattention.attention.prefill_kernels import default_prefill_config

        self.use_triton = triton_usable(self.device) is None  # else: the gather fallback
        # (BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel
        self.prefill_config = prefill_config or default_prefill_config(head_dim, self.device)

    def _build(self, meta: AttentionMetadata) -> _Plan:
        q_lens, dev = meta.query_lens_host, self.device
        starts = self.query_starts(meta)
        fa2 = dev.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
        prefill = [i for i, n in enumerate(q_lens) if n > 1]
        fresh = [
            i for i in prefill
            if meta.seq_lens_host[i] == q_lens[i] and (fa2 or not self.use_triton)
        ]  # fmt: skip
        is_fresh = set(fresh)
        fields: dict[str, Any] = {}
        if not self.use_triton:
            fields["gathered"] = tuple(i for i in range(len(q_lens)) if i not in is_fresh)
        else:
            tiled = [i for i in prefill if i not in is_fresh]
            fields["mixed"] = plan_mixed(meta, self.prefill_config[0], tiled)
        if fresh:
            cu = [0]
            for i in fresh:
                cu.append(cu[-1] + q_lens[i])
            rows = [r for i in fresh for r in range(starts[i], starts[i + 1])]
            fields.update(
                fresh_rows=h2d(rows, torch.int64, dev),
                fresh_cu=h2d(cu, torch.int32, dev),
                fresh_max=max(q_lens[i] for i in fresh),
            )
        return _Plan(**fields)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        tables = self.check_step(q, meta)
        self.write_kv(layer, k, v, meta)
        if meta.mixed is not None:  # fixed shapes (a CUDA graph): no host list is read
            return self._run_planned(layer, q, tables, meta, meta.mixed, torch.empty_like(q))
        if meta.is_decode_only and self.use_triton:
            return self._decode(layer, q, tables, meta.seq_lens, meta.max_seq_len)
        plan = self.plan(meta, "pa_triton", lambda: self._build(meta))
        out = torch.empty_like(q)
        if plan.fresh_rows is not None and plan.fresh_cu is not None:
            rows = plan.fresh_rows
            out[rows] = self._fresh(q[rows], k[rows], v[rows], plan.fresh_cu, plan.fresh_max)
        if plan.mixed is not None:
            self._run_planned(layer, q, tables, meta, plan.mixed, out)
        if plan.gathered:
            attend_gathered(self, layer, q, meta, list(plan.gathered), out)
        return out

    @property
    def supports_decode_graphs(self) -> bool:
        return self.use_triton  # the gather fallback reads the host lists

    @property
    def mixed_graph_block_m(self) -> int | None:
        """The tile height a captured mixed step plans with (None: Triton cannot run here)."""
        return self.prefill_config[0] if self.use_triton else None

    def _run_planned(
        self,
        layer: int,
        q: torch.Tensor,
        tables: torch.Tensor,
        meta: AttentionMetadata,
        plan: MixedPlan,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Fill `out`'s rows of `plan`: its tiles by the prefill kernel, its decode rows by the
        split-K kernel (a captured step's `meta.mixed` covers every row this way)."""
        if plan.tile_req is not None and plan.tile_row is not None:
            from vattention.attention.prefill_kernels import prefill_attention

            k_pool, v_pool = self.layer_kv(layer)
            block_m, block_n, warps, stages = self.prefill_config
            prefill_attention(
                q, k_pool, v_pool, meta.query_start_loc, meta.seq_lens, plan.tile_req,
                plan.tile_row, self.scale, out, block_tables=tables, block_m=block_m,
                block_n=block_n, num_warps=warps, num_stages=stages,
            )  # fmt: skip
        if plan.decode_rows is not None and plan.decode_idx is not None:
            rows, idx = plan.decode_rows, plan.decode_idx
            out[rows] = self._decode(layer, q[rows], tables[idx], meta.seq_lens[idx],
                                     plan.decode_max_len)  # fmt: skip
        return out

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError(
            "pa_triton attends inside forward() (fresh prompts use the new K/V)"
        )

    def _decode(
        self,
        layer: int,
        q: torch.Tensor,
        tables: torch.Tensor,
        seq_lens: torch.Tensor,
        max_len: int,
    ) -> torch.Tensor:
        from vattention.attention.decode_kernels import decode_attention

        k_pool, v_pool = self.layer_kv(layer)
        return decode_attention(
            q, k_pool, v_pool, seq_lens, seq_lens, self.scale, max_len, block_tables=tables
        )

    def _fresh(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int
    ) -> torch.Tensor:
        """Causal attention of fresh prompts over their own new K/V (no cache read)."""
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from vattention.attention.fa2 import flash_varlen

            return flash_varlen(q, k, v, cu, cu, cu[1:] - cu[:-1], max_len, max_len, self.scale)
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            out[a:b] = attend_one(q[a:b], k[a:b], v[a:b], self.scale, 0)
        return out
