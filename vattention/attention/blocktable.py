"""Attention backends for the PagedAttention baseline (`PagedKVCache`: block pools + tables).

- `pa_triton` (CUDA; CPU under the Triton interpreter): decode rows through the contiguous
  backends' own split-K kernel (`decode_kernels`) in its block-table mode, and prefill rows
  (continued chunks and fresh prompts alike) through the causal prefill kernel written for
  both caches (`prefill_kernels`) in its block-table mode, all of a step's rows in one launch,
  so the comparison measures the addressing and nothing else. Fresh prompts of at least
  `cudnn_min_tokens` new tokens (4096; 0: never) and `cudnn_min_work` new x context tokens
  (`sdpa.CUDNN_MIN_WORK`: a fresh prompt of 8K or more) take one cuDNN SDPA call each on
  their new K/V directly, by the same rule as the contiguous side's `auto` (a fresh prompt needs nothing from the
  cache, so paging costs it nothing there). Where Triton cannot run (the CPU without
  `TRITON_INTERPRET=1`, see `triton_decode.triton_usable`) every row falls back to
  gather-then-SDPA (`paged_torch.attend_gathered`), fresh prompts to per-request SDPA on the
  new K/V.
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
from vattention.attention.mixed import MixedPlan, plan_mixed
from vattention.attention.paged_base import PagedBackend
from vattention.attention.paged_torch import attend_gathered
from vattention.attention.sdpa import (
    CUDNN_MIN_TOKENS,
    CUDNN_MIN_WORK,
    prefer_cudnn,
    sdpa_causal,
    takes_cudnn,
)
from vattention.attention.triton_decode import triton_usable


@dataclass(frozen=True)
class _Plan:
    """A mixed batch cut into fresh prompts attended on their new K/V (long ones; all of them
    where Triton cannot run), decode rows and prefill-kernel tiles (`mixed`), or, where Triton
    cannot run, gathered requests; built once per step."""

    mixed: MixedPlan | None = None  # decode rows + tiles of the continued chunks (Triton)
    gathered: tuple[int, ...] = ()  # requests by gather-then-SDPA (where Triton cannot run)
    fresh: tuple[int, ...] = ()  # requests attended on their new K/V (one SDPA call each)


@register_backend
class PagedTritonBackend(PagedBackend):
    """Paged Triton decode and causal prefill kernels (block-table modes of the contiguous
    backends' kernels); cuDNN on the new K/V for long fresh prompts."""

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
        cudnn_min_tokens: int = CUDNN_MIN_TOKENS,
        cudnn_min_work: int = CUDNN_MIN_WORK,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        if cudnn_min_tokens < 0 or cudnn_min_work < 0:
            raise ValueError(
                f"cudnn_min_tokens and cudnn_min_work must be >= 0, got {cudnn_min_tokens} "
                f"and {cudnn_min_work}"
            )
        self.cudnn_min_tokens = cudnn_min_tokens
        self.cudnn_min_work = cudnn_min_work
        from vattention.attention.prefill_kernels import default_prefill_config

        self.use_triton = triton_usable(self.device) is None  # else: the gather fallback
        # (BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel
        self.prefill_config = prefill_config or default_prefill_config(head_dim, self.device)

    def _build(self, meta: AttentionMetadata) -> _Plan:
        q_lens, s_lens = meta.query_lens_host, meta.seq_lens_host
        low, work = self.cudnn_min_tokens, self.cudnn_min_work
        prefill = [i for i, n in enumerate(q_lens) if n > 1]
        fresh = [
            i for i in prefill
            if s_lens[i] == q_lens[i]
            and (not self.use_triton or takes_cudnn(q_lens[i], s_lens[i], low, work))
        ]  # fmt: skip
        is_fresh = set(fresh)
        if not self.use_triton:
            gathered = tuple(i for i in range(len(q_lens)) if i not in is_fresh)
            return _Plan(gathered=gathered, fresh=tuple(fresh))
        tiled = [i for i in prefill if i not in is_fresh]
        return _Plan(mixed=plan_mixed(meta, self.prefill_config[0], tiled), fresh=tuple(fresh))

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        tables = self.check_step(q, meta)
        self.write_kv(layer, k, v, meta)
        if meta.mixed is not None:  # fixed shapes (a CUDA graph): no host list is read
            return self._run_planned(layer, q, tables, meta, meta.mixed, torch.empty_like(q))
        if meta.is_decode_only and self.use_triton:
            return self._decode(layer, q, tables, meta.seq_lens, meta.max_seq_len, meta.prefix)
        plan = self.plan(meta, "pa_triton", lambda: self._build(meta))
        out = torch.empty_like(q)
        if plan.fresh:
            self._fresh(q, k, v, self.query_starts(meta), plan.fresh, out)
        if plan.mixed is not None:
            self._run_planned(layer, q, tables, meta, plan.mixed, out)
        if plan.gathered:
            attend_gathered(self, layer, q, meta, list(plan.gathered), out)
        return out

    @property
    def supports_decode_graphs(self) -> bool:
        return self.use_triton  # the gather fallback reads the host lists

    @property
    def supports_cascade(self) -> bool:
        return self.use_triton

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
        prefix: Any = None,
    ) -> torch.Tensor:
        """`prefix` (a `SharedPrefix` whose leader is a row of `tables`): whole batches only."""
        from vattention.attention.decode_kernels import decode_attention

        k_pool, v_pool = self.layer_kv(layer)
        return decode_attention(
            q,
            k_pool,
            v_pool,
            seq_lens,
            seq_lens,
            self.scale,
            max_len,
            block_tables=tables,
            prefix=prefix,
        )

    def _fresh(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        starts: list[int],
        fresh: tuple[int, ...],
        out: torch.Tensor,
    ) -> None:
        """Causal attention of fresh prompts over their own new K/V (no cache read): one SDPA
        call each, cuDNN first on CUDA."""
        with prefer_cudnn(q.is_cuda):
            for i in fresh:
                a, b = starts[i], starts[i + 1]
                o = sdpa_causal(
                    q[a:b].transpose(0, 1).unsqueeze(0),
                    k[a:b].transpose(0, 1).unsqueeze(0),
                    v[a:b].transpose(0, 1).unsqueeze(0),
                    self.scale,
                    0,
                )
                out[a:b] = o.squeeze(0).transpose(0, 1)
