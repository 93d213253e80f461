"""Attention backends for the PagedAttention baseline (`PagedKVCache`: block pools + tables).

- `pa_triton` (CUDA; CPU under the Triton interpreter): decode rows through the paged Triton
  split-K kernel (`blocktable_kernels`), fresh prompts (no cached context) through FA2 varlen on
  the new K/V directly (what vLLM does too: a fresh prompt needs nothing from the cache), and
  continued prefill chunks by gather-then-SDPA (labelled: torch ships no paged prefill kernel
  for small blocks; FA2's own paged mode needs blocks of 256 tokens).
Writes go through `meta.slot_mapping` (`block * block_size + offset` per new token).
Invariant: only the first `seq_len` tokens of a request's table are read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vattention.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    KVCacheView,
    register_backend,
)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[n_q, Hq, D]` over k, v `[n_k, Hkv, D]`, causal aligned bottom-right -> `[n_q, Hq, D]`."""
    n_q, n_k = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    mask = None
    if n_q > 1:
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


class PagedBackend(AttentionBackend):
    """Shared part: pool checks, slot-mapping writes, per-request gathers."""

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
        if pool.dim() != 4 or pool.shape[2] != num_kv_heads or pool.shape[3] != head_dim:
            raise ValueError(
                f"a paged backend needs pools [blocks, block_size, {num_kv_heads}, {head_dim}], "
                f"got {tuple(pool.shape)}"
            )
        self.block_size = pool.shape[1]
        self.device = pool.device
        self.dtype = pool.dtype

    def write_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        if meta.slot_mapping is None:
            raise ValueError("paged attention needs metadata built with block_tables")
        h, d = self.num_kv_heads, self.head_dim
        self.cache.k_cache(layer).view(-1, h, d).index_copy_(0, meta.slot_mapping, k)
        self.cache.v_cache(layer).view(-1, h, d).index_copy_(0, meta.slot_mapping, v)

    def gather(
        self, layer: int, meta: AttentionMetadata, i: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Request i's first `seq_len` tokens of K and V as dense copies `[seq_len, Hkv, D]`."""
        assert meta.block_tables is not None
        n = meta.seq_lens_host[i]
        blocks = meta.block_tables[i, : -(-n // self.block_size)]
        h, d = self.num_kv_heads, self.head_dim
        k = self.cache.k_cache(layer)[blocks].reshape(-1, h, d)[:n]
        v = self.cache.v_cache(layer)[blocks].reshape(-1, h, d)[:n]
        return k, v

    def attend_gathered(
        self,
        layer: int,
        q: torch.Tensor,
        meta: AttentionMetadata,
        rows: list[int],
        out: torch.Tensor,
    ) -> None:
        start = 0
        starts = []
        for n in meta.query_lens_host:
            starts.append(start)
            start += n
        for i in rows:
            a, n_q = starts[i], meta.query_lens_host[i]
            k, v = self.gather(layer, meta, i)
            out[a : a + n_q] = _causal_sdpa(q[a : a + n_q], k, v, self.scale)


@register_backend
class PagedTritonBackend(PagedBackend):
    """Paged Triton decode; FA2 varlen for fresh prompts; gather-then-SDPA for continued chunks."""

    name = "pa_triton"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        import triton  # noqa: F401  (an ImportError here just leaves the backend unregistered)

        self._plans: tuple[int, dict[str, object]] = (0, {})

    def _plan(self, meta: AttentionMetadata) -> dict[str, object]:
        if self._plans[0] == id(meta):
            return self._plans[1]
        q_lens, ctx = (
            meta.query_lens_host,
            [s - q for s, q in zip(meta.seq_lens_host, meta.query_lens_host, strict=True)],
        )
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        decode = [i for i, n in enumerate(q_lens) if n == 1]
        fresh = [i for i, n in enumerate(q_lens) if n > 1 and ctx[i] == 0]
        cont = [i for i, n in enumerate(q_lens) if n > 1 and ctx[i] > 0]
        dev = self.device
        plan: dict[str, object] = {"decode": decode, "fresh": fresh, "cont": cont}
        if decode and len(decode) < meta.num_seqs:
            idx = torch.tensor(decode, dtype=torch.int64).to(dev)
            plan["decode_rows"] = torch.tensor([starts[i] for i in decode], dtype=torch.int64).to(
                dev
            )
            plan["decode_idx"] = idx
            plan["decode_max"] = max(meta.seq_lens_host[i] for i in decode)
        if fresh:
            rows = [r for i in fresh for r in range(starts[i], starts[i + 1])]
            cu = [0]
            for i in fresh:
                cu.append(cu[-1] + q_lens[i])
            plan["fresh_rows"] = torch.tensor(rows, dtype=torch.int64).to(dev)
            plan["fresh_cu"] = torch.tensor(cu, dtype=torch.int32).to(dev)
            plan["fresh_max"] = max(q_lens[i] for i in fresh)
        self._plans = (id(meta), plan)
        return plan

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        self.write_kv(layer, k, v, meta)
        if meta.is_decode_only:
            return self._decode(layer, q, meta.block_tables, meta.seq_lens, meta.max_seq_len)
        plan = self._plan(meta)
        out = torch.empty_like(q)
        if plan["decode"]:
            rows, idx = plan["decode_rows"], plan["decode_idx"]
            assert isinstance(rows, torch.Tensor) and isinstance(idx, torch.Tensor)
            assert meta.block_tables is not None
            max_len = int(plan["decode_max"])  # type: ignore[call-overload]
            out[rows] = self._decode(
                layer, q[rows], meta.block_tables[idx], meta.seq_lens[idx], max_len
            )
        if plan["fresh"]:
            rows = plan["fresh_rows"]
            assert isinstance(rows, torch.Tensor)
            out[rows] = self._fresh(q[rows], k[rows], v[rows], plan, meta)
        cont = plan["cont"]
        assert isinstance(cont, list)
        if cont:
            self.attend_gathered(layer, q, meta, cont, out)
        return out

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError(
            "pa_triton attends inside forward() (fresh prompts use the new K/V)"
        )

    def _decode(
        self,
        layer: int,
        q: torch.Tensor,
        tables: torch.Tensor | None,
        seq_lens: torch.Tensor,
        max_len: int,
    ) -> torch.Tensor:
        from vattention.attention.blocktable_kernels import paged_decode_attention

        assert tables is not None
        return paged_decode_attention(
            q,
            self.cache.k_cache(layer),
            self.cache.v_cache(layer),
            tables,
            seq_lens,
            self.scale,
            max_len,
        )

    def _fresh(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: dict[str, object],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cu = plan["fresh_cu"]
        assert isinstance(cu, torch.Tensor)
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from vattention.attention.fa2 import flash_varlen

            n = int(plan["fresh_max"])  # type: ignore[call-overload]
            return flash_varlen(q, k, v, cu, cu, cu[1:] - cu[:-1], n, n, self.scale)
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            out[a:b] = _causal_sdpa(q[a:b], k[a:b], v[a:b], self.scale)
        return out
