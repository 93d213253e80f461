"""Attention backends for the PagedAttention baseline (`PagedKVCache`: block pools + tables).

- `pa_triton` (CUDA; CPU under the Triton interpreter): decode rows through the contiguous
  backends' own split-K kernel (`decode_kernels`) in its block-table mode, so the comparison
  measures the addressing and nothing else; fresh prompts (no cached context) through FA2 varlen on
  the new K/V directly (what vLLM does too: a fresh prompt needs nothing from the cache), and
  continued prefill chunks by gather-then-SDPA (labelled: torch ships no paged prefill kernel
  for small blocks; FA2's own paged mode needs blocks of 256 tokens).
Writes go through `meta.slot_mapping` (`block * block_size + offset` per new token).
Invariant: only the first `seq_len` tokens of a request's table are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattention.attention.base import AttentionMetadata, register_backend
from vattention.attention.paged_base import PagedBackend
from vattention.attention.paged_torch import attend_gathered
from vattention.attention.torch_ref import attend_one


@dataclass(frozen=True)
class _Plan:
    """A mixed batch cut into decode rows, fresh prompts and continued chunks (built once)."""

    cont: list[int]
    decode_rows: torch.Tensor | None = None
    decode_idx: torch.Tensor | None = None
    decode_max: int = 0
    fresh_rows: torch.Tensor | None = None
    fresh_cu: torch.Tensor | None = None
    fresh_max: int = 0


@register_backend
class PagedTritonBackend(PagedBackend):
    """Paged Triton decode; FA2 varlen for fresh prompts; gather-then-SDPA for continued chunks."""

    name = "pa_triton"

    def _build(self, meta: AttentionMetadata) -> _Plan:
        q_lens, dev = meta.query_lens_host, self.device
        ctx = [s - q for s, q in zip(meta.seq_lens_host, q_lens, strict=True)]
        starts = self.query_starts(meta)
        decode = [i for i, n in enumerate(q_lens) if n == 1]
        fresh = [i for i, n in enumerate(q_lens) if n > 1 and ctx[i] == 0]
        cont = [i for i, n in enumerate(q_lens) if n > 1 and ctx[i] > 0]
        plan = _Plan(cont)
        if decode:
            plan = _Plan(
                cont,
                decode_rows=_h2d([starts[i] for i in decode], torch.int64, dev),
                decode_idx=_h2d(decode, torch.int64, dev),
                decode_max=max(meta.seq_lens_host[i] for i in decode),
            )
        if fresh:
            rows = [r for i in fresh for r in range(starts[i], starts[i + 1])]
            cu = [0]
            for i in fresh:
                cu.append(cu[-1] + q_lens[i])
            plan = _Plan(
                cont, plan.decode_rows, plan.decode_idx, plan.decode_max,
                fresh_rows=_h2d(rows, torch.int64, dev),
                fresh_cu=_h2d(cu, torch.int32, dev),
                fresh_max=max(q_lens[i] for i in fresh),
            )  # fmt: skip
        return plan

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        tables = self.check_step(q, meta)
        self.write_kv(layer, k, v, meta)
        if meta.is_decode_only:
            return self._decode(layer, q, tables, meta.seq_lens, meta.max_seq_len)
        plan = self.plan(meta, "pa_triton", lambda: self._build(meta))
        out = torch.empty_like(q)
        if plan.decode_rows is not None and plan.decode_idx is not None:
            rows, idx = plan.decode_rows, plan.decode_idx
            out[rows] = self._decode(
                layer, q[rows], tables[idx], meta.seq_lens[idx], plan.decode_max
            )
        if plan.fresh_rows is not None and plan.fresh_cu is not None:
            rows = plan.fresh_rows
            out[rows] = self._fresh(q[rows], k[rows], v[rows], plan.fresh_cu, plan.fresh_max)
        if plan.cont:
            attend_gathered(self, layer, q, meta, plan.cont, out)
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


def _h2d(values: list[int], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A host list on the device without waiting for queued GPU work (async scheduling)."""
    return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)
