"""`auto` (the default backend): a fixed, small number of launches per layer whatever the batch.

On CUDA:
- decode-only batches -> `decode` (default `triton_decode`; `fa2_varlen` or `sdpa` without Triton);
- mixed batches (see `mixed.py`) -> the decode kernel for the rows with one new token (one
  launch) plus one varlen launch for the requests with more: `prefill="triton"` (the default
  on CUDA: our shared prefill kernel, `prefill_kernels`, which reads the contiguous cache
  1.3-1.5x faster than FA2 on the H200, 1-8K tokens), `"fa2_varlen"` (torch's
  FlashAttention-2 reading the cache in place; the default without Triton), or `"sdpa"` (one
  SDPA call per request). Under `triton` and `fa2_varlen`, requests with at least
  `cudnn_min_tokens` new tokens and `cudnn_min_work` new x context tokens go to cuDNN instead
  (`cudnn_min_tokens=0` turns that off; `cudnn_min_work=0` drops the work condition): a
  fresh prompt as one call, a chunk over a cached context as two (`split_chunk`: the context
  without a mask, the chunk causal, merged by log-sum-exp) where this torch runs them
  (`split_chunks`: None probes the device once; on the CPU they are off unless asked for).
  cuDNN builds a graph per new (query, key) shape, which only long chunks over long contexts
  repay (`sdpa.CUDNN_MIN_WORK`: 8K new tokens over 8K).
- a step captured in a CUDA graph carries a fixed-shape `meta.mixed` plan; it always runs the
  decode kernel plus the Triton prefill kernel over sentinel-padded tiles (no host lists read).
On the CPU the default decode kernel is `torch_sdpa_ref` and prefill goes through `sdpa`'s
per-request path (both plain torch); `decode="triton_decode"` and `prefill="triton"` also work
there under the Triton interpreter, which is how the CPU tests cover the mixed-batch split.
Each sub-backend shares the cache; per-step index tensors are built once per metadata object.
"""

from __future__ import annotations

import torch

from vattention.attention.base import (
    AttentionMetadata,
    KVCacheView,
    get_backend_class,
    register_backend,
)
from vattention.attention.contiguous import ContiguousBackend
from vattention.attention.fa2 import flash_varlen, flat_rows, slot_offsets
from vattention.attention.mixed import MixedPlan, plan_mixed
from vattention.attention.sdpa import (
    CUDNN_MIN_TOKENS,
    CUDNN_MIN_WORK,
    prefer_cudnn,
    sdpa_requests,
    takes_cudnn,
)
from vattention.attention.split_chunk import cudnn_lse_usable, split_chunk_attention
from vattention.attention.triton_decode import TritonDecodeBackend, triton_usable

_DECODE_CHOICES = ("triton_decode", "fa2_varlen", "sdpa", "flex", "torch_sdpa_ref")
_PREFILL_CHOICES = ("fa2_varlen", "triton", "sdpa")


@register_backend
class AutoBackend(ContiguousBackend):
    """Triton split-K decode plus one varlen prefill launch (FA2, or our Triton kernel)."""

    name = "auto"

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        *,
        decode: str | None = None,
        prefill: str | None = None,
        cudnn_min_tokens: int = CUDNN_MIN_TOKENS,
        cudnn_min_work: int = CUDNN_MIN_WORK,
        split_chunks: bool | None = None,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        if decode is not None and decode not in _DECODE_CHOICES:
            raise ValueError(f"decode must be one of {_DECODE_CHOICES}, got {decode!r}")
        if prefill is not None and prefill not in _PREFILL_CHOICES:
            raise ValueError(f"prefill must be one of {_PREFILL_CHOICES}, got {prefill!r}")
        if cudnn_min_tokens < 0 or cudnn_min_work < 0:
            raise ValueError(
                f"cudnn_min_tokens and cudnn_min_work must be >= 0, got {cudnn_min_tokens} "
                f"and {cudnn_min_work}"
            )
        args = (cache, num_heads, num_kv_heads, head_dim, self.scale)
        cuda = self.device.type == "cuda"
        fa2_ok = cuda and self.dtype in (torch.float16, torch.bfloat16)
        fa2_ok = fa2_ok and head_dim <= 256 and not head_dim % 8
        pow2 = head_dim >= 16 and not head_dim & (head_dim - 1)
        triton_ok = pow2 and triton_usable(self.device) is None
        if prefill is None:  # our Triton kernel reads the contiguous cache fastest
            prefill = "triton" if cuda and triton_ok else ("fa2_varlen" if fa2_ok else "sdpa")
        if prefill == "fa2_varlen" and not fa2_ok:
            raise ValueError(f"fa2_varlen cannot run this cache ({self.device}, {self.dtype})")
        if prefill == "triton" and not triton_ok:
            raise ValueError(f"the Triton prefill kernel cannot run this cache ({self.device})")
        if decode is None:
            if cuda and triton_ok:
                decode = "triton_decode"
            elif cuda:
                decode = "fa2_varlen" if fa2_ok else "sdpa"
            else:
                decode = "torch_sdpa_ref"
        self._decode = get_backend_class(decode)(*args)
        self.prefill = prefill
        self.cudnn_min_tokens = cudnn_min_tokens
        self.cudnn_min_work = cudnn_min_work
        if split_chunks is None:
            split_chunks = cudnn_lse_usable(self.device, self.dtype, num_heads, num_kv_heads)
        self.split_chunks = split_chunks
        self._tiles_config: tuple[int, int, int, int] | None = None
        if triton_ok:
            from vattention.attention.prefill_kernels import default_prefill_config

            self._tiles_config = default_prefill_config(head_dim, self.device)

    # -- CUDA graphs ---------------------------------------------------------------------------
    @property
    def supports_decode_graphs(self) -> bool:
        return self._decode.supports_decode_graphs  # decode-only steps go to it whole

    @property
    def supports_cascade(self) -> bool:
        return self._decode.supports_cascade

    @property
    def mixed_graph_block_m(self) -> int | None:
        """The tile height a captured mixed step must plan with, or None if this backend cannot
        run mixed steps from a fixed-shape plan (no Triton decode or prefill kernel)."""
        if self._tiles_config is None or not isinstance(self._decode, TritonDecodeBackend):
            return None
        return self._tiles_config[0]

    # -- AttentionBackend ---------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.check_q(q, meta)
        if meta.mixed is not None:  # fixed shapes (a CUDA graph): no host list is read
            return self._attend_planned(layer, q, meta, meta.mixed, triton_prefill=True)
        if meta.is_decode_only:
            return self._decode.attend(layer, q, meta)
        if self._tiles_config is None or self.prefill != "triton":
            plan = self.plan(meta, "mixed", lambda: plan_mixed(meta, None))
            return self._attend_planned(layer, q, meta, plan, triton_prefill=False)
        block_m = self._tiles_config[0]

        def tiled_plan() -> MixedPlan:  # the prefill rows cuDNN does not take, as tiles
            _, _, rest = self.plan(meta, "cudnn_split", lambda: self._cudnn_split(meta))
            return plan_mixed(meta, block_m, tiled=rest)

        plan = self.plan(meta, "mixed", tiled_plan)
        return self._attend_planned(layer, q, meta, plan, triton_prefill=True)

    def _attend_planned(
        self,
        layer: int,
        q: torch.Tensor,
        meta: AttentionMetadata,
        plan: MixedPlan,
        triton_prefill: bool,
    ) -> torch.Tensor:
        k_cache, v_cache = self.layer_kv(layer)
        out = torch.empty_like(q)
        if triton_prefill:
            if meta.mixed is None:  # eager: long prompts and chunks through cuDNN
                fresh, chunks, _ = self.plan(meta, "cudnn_split", lambda: self._cudnn_split(meta))
                self._cudnn_prefill(q, k_cache, v_cache, meta, fresh, chunks, out)
            if plan.tile_req is not None and plan.tile_row is not None:
                self._triton_prefill(q, k_cache, v_cache, meta, plan, out)
        else:
            self._long_prefill(q, k_cache, v_cache, meta, out)
        if plan.decode_rows is not None and plan.decode_idx is not None:
            rows, idx = plan.decode_rows, plan.decode_idx
            if isinstance(self._decode, TritonDecodeBackend):
                out[rows] = self._decode.decode(
                    q[rows], k_cache, v_cache, meta.slots[idx], meta.seq_lens[idx],
                    plan.decode_max_len,
                )  # fmt: skip
            else:
                sdpa_requests(
                    q, k_cache, v_cache, meta, self.starts(meta), plan.decode, self.scale, out
                )
        return out

    def _triton_prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        plan: MixedPlan,
        out: torch.Tensor,
    ) -> None:
        from vattention.attention.prefill_kernels import prefill_attention

        assert self._tiles_config is not None and plan.tile_req is not None
        assert plan.tile_row is not None
        block_m, block_n, warps, stages = self._tiles_config
        prefill_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, plan.tile_req,
            plan.tile_row, self.scale, out, slots=meta.slots, block_m=block_m, block_n=block_n,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def _long_prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor,
    ) -> None:
        """Long fresh prompts: one cuDNN call each; long chunks: two (`split_chunk`); all other
        prefill rows: one FA2 launch (`prefill="sdpa"`: one SDPA call each)."""
        fresh, chunks, rest = self.plan(meta, "cudnn_split", lambda: self._cudnn_split(meta))
        self._cudnn_prefill(q, k_cache, v_cache, meta, fresh, chunks, out)
        if not rest:
            return
        if self.prefill != "fa2_varlen":
            with prefer_cudnn(q.is_cuda):
                sdpa_requests(q, k_cache, v_cache, meta, self.starts(meta), rest, self.scale, out)
            return
        self._fa2_prefill(q, k_cache, v_cache, meta, rest, out)

    def _cudnn_prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        fresh: list[int],
        chunks: list[int],
        out: torch.Tensor,
    ) -> None:
        """Long fresh prompts: one cuDNN call each; long chunks: two (`split_chunk`)."""
        if fresh:
            with prefer_cudnn(q.is_cuda):
                sdpa_requests(q, k_cache, v_cache, meta, self.starts(meta), fresh, self.scale, out)
        if chunks:
            sdpa_requests(q, k_cache, v_cache, meta, self.starts(meta), chunks, self.scale, out,
                          split_chunk_attention)  # fmt: skip

    def _fa2_prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        varlen: list[int],
        out: torch.Tensor,
    ) -> None:
        """The requests `varlen` in one FA2 varlen launch over the flat cache rows."""
        k_flat, v_flat = flat_rows(k_cache), flat_rows(v_cache)
        if k_flat is None or v_flat is None or k_flat[1] != v_flat[1]:
            with prefer_cudnn(False):  # no flat view: per-request flash calls
                sdpa_requests(q, k_cache, v_cache, meta, self.starts(meta), varlen, self.scale, out)
            return
        rows_per_slot, total = k_flat[1], k_flat[0].shape[0]
        sub = self.plan(meta, ("varlen", rows_per_slot), lambda: self._varlen_subset(
            meta, varlen, rows_per_slot, total))  # fmt: skip
        rows, cu_q, seq_used, cu_k, max_q, max_k = sub
        out[rows] = flash_varlen(
            q[rows], k_flat[0], v_flat[0], cu_q, cu_k, seq_used, max_q, max_k, self.scale
        )

    def _cudnn_split(self, meta: AttentionMetadata) -> tuple[list[int], list[int], list[int]]:
        """(long fresh prompts, long chunks to split, the other prefill requests) of a step."""
        q_lens, s_lens = meta.query_lens_host, meta.seq_lens_host
        prefill = [i for i, n in enumerate(q_lens) if n > 1]
        low, work = self.cudnn_min_tokens, self.cudnn_min_work
        if not low:
            return [], [], list(prefill)
        long = [i for i in prefill if takes_cudnn(q_lens[i], s_lens[i], low, work)]
        fresh = [i for i in long if s_lens[i] == q_lens[i]]
        chunks = [i for i in long if s_lens[i] > q_lens[i]] if self.split_chunks else []
        chosen = set(fresh) | set(chunks)
        return fresh, chunks, [i for i in prefill if i not in chosen]

    def _varlen_subset(
        self, meta: AttentionMetadata, varlen: list[int], rows_per_slot: int, total: int
    ) -> tuple[torch.Tensor | slice, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """(q rows, cum_seq_q, seqused_k, cum_seq_k, max_q, max_k) of the requests `varlen`."""
        starts = self.starts(meta)
        first, last = varlen[0], varlen[-1]
        dev = meta.slots.device
        if varlen == list(range(first, last + 1)):  # consecutive requests: slices, no gather
            rows: torch.Tensor | slice = slice(starts[first], starts[last + 1])
            cu_q = meta.query_start_loc[first : last + 2] - starts[first]
            slots, seq_used = meta.slots[first : last + 1], meta.seq_lens[first : last + 1]
        else:
            flat = [r for i in varlen for r in range(starts[i], starts[i + 1])]
            cu = [0]
            for i in varlen:
                cu.append(cu[-1] + meta.query_lens_host[i])
            rows = torch.tensor(flat, dtype=torch.int64).to(dev, non_blocking=True)
            cu_q = torch.tensor(cu, dtype=torch.int32).to(dev, non_blocking=True)
            idx = torch.tensor(varlen, dtype=torch.int64).to(dev, non_blocking=True)
            slots, seq_used = meta.slots[idx], meta.seq_lens[idx]
        max_q = max(meta.query_lens_host[i] for i in varlen)
        max_k = max(meta.seq_lens_host[i] for i in varlen)
        cu_k = slot_offsets(slots, rows_per_slot, total)
        return rows, cu_q.to(torch.int32), seq_used, cu_k, max_q, max_k
