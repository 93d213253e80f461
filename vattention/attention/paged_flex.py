"""`paged_flex`: FlexAttention over the paged cache, the block table turned into a `BlockMask`.

The idea of torch's `torch.nn.attention.experimental._paged_attention.PagedAttention`, with the
mask built straight from our block tables: the pool `[num_blocks, block_size, Hkv, D]` is seen as
ONE sequence of `num_blocks * block_size` keys (`[1, Hkv, N * bs, D]`, a view), the mask's KV
block size is the page size, and request b's row of the mask lists its physical blocks, so the
kernel reads only them. Flex broadcasts that single K/V "batch" over the query batch.
- decode (one launch for every one-token request): the request's blocks, all "partial" (flex's
  decoding kernel splits the KV of a row across CTAs only without "full" blocks), masked to
  `position < seq_len`; built with device ops from the metadata only (CUDA-graph safe);
- prefill (one launch per request, query length > 1): q blocks of `q_block` rows; kv blocks wholly
  below the diagonal are full, the rest partial with the causal mask on logical positions.
Compiled flex loads whole KV tiles of a block and multiplies V by the masked entries' zero
weights, and 0 * NaN is NaN: a request's last block may hold anything (NaN and Inf included) past
its length, so before a layer's launches those rows are zeroed in its K and V pools. That is the
one write besides the new tokens (`paged_base`'s invariant), to rows no request reads as context.
Mask functions are exact on every (query, key) pair, as flex requires: they read per-step
tables `owner` (physical block -> batch index) and `logical` (its index in that request's table),
persistent buffers updated in place, so one compiled kernel serves every step. Compiled on CUDA
(`torch.compile`, one dynamo cache per stride pattern), eager on the CPU (tests).
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from vattention.attention.base import AttentionMetadata, KVCacheView, register_backend
from vattention.attention.flex import kernel_options
from vattention.attention.paged_base import PagedBackend


def _flex_call(*args: Any, **kwargs: Any) -> Any:
    return flex_attention(*args, **kwargs)


@functools.cache
def _compiled_flex(pattern: tuple[int, ...]) -> Callable[..., Any]:
    """A compiled flex per q/K/V stride pattern, each with a dynamo cache of its own (the trick
    of `flex._compiled_flex`: torch 2.11's flex template has no kernel for symbolic strides)."""
    code = _flex_call.__code__.replace(co_name=f"_paged_flex_call_{abs(hash(pattern))}")
    return torch.compile(types.FunctionType(code, _flex_call.__globals__, code.co_name))


def _block_mask(
    num: torch.Tensor,
    idx: torch.Tensor,
    full: tuple[torch.Tensor, torch.Tensor] | None,
    block_size: tuple[int, int],
    mask_mod: Callable[..., Any],
    seq_lengths: tuple[int, int],
) -> BlockMask:
    """`BlockMask.from_kv_blocks` from `[B, q_blocks]` counts and `[B, q_blocks, width]` block
    indices (partial blocks, and optionally full ones), without the transposed (backward-only)
    indices where this torch allows it."""

    def i32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int32).unsqueeze(1).contiguous()

    fn, fi = (i32(full[0]), i32(full[1])) if full else (None, None)
    try:
        return BlockMask.from_kv_blocks(
            i32(num), i32(idx), fn, fi, block_size, mask_mod, seq_lengths, compute_q_blocks=False
        )
    except TypeError:  # a torch without compute_q_blocks
        return BlockMask.from_kv_blocks(
            i32(num), i32(idx), fn, fi, block_size, mask_mod, seq_lengths
        )


@dataclass
class _Plan:
    tail_rows: torch.Tensor  # [B * bs] pool rows zeroed before the launches (see the docstring)
    decode_mask: BlockMask | None  # one launch for every one-token request
    decode_rows: torch.Tensor | None  # their rows of q (None: the batch is decode-only)
    prefill_masks: dict[int, BlockMask]  # request index -> its causal block mask


@register_backend
class PagedFlexBackend(PagedBackend):
    """FlexAttention whose block mask follows the block tables (see the module docstring)."""

    name = "paged_flex"
    supports_decode_graphs = True  # decode plans are built with device ops only

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        *,
        q_block: int = 128,
        kernel_options: dict[str, Any] | None = None,
        max_batch: int = 1024,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        pool = cache.k_cache(0)
        if pool.stride(0) != self.block_size * pool.stride(1):
            raise ValueError(
                f"paged_flex needs blocks laid end to end (stride(0) = block_size * stride(1)), "
                f"got strides {pool.stride()}"
            )
        self.q_block = q_block
        bs = self.block_size
        if self.device.type == "cuda" and bs < 16:
            # Compiled flex multiplies P (a KV tile wide) by V: Triton's dot needs K >= 16.
            raise ValueError(
                f"paged_flex on CUDA needs block_size >= 16 (its KV tile is one page and Triton's "
                f"dot needs 16), got {bs}; use paged_triton for smaller blocks"
            )
        if kernel_options is None and bs < 128:
            # Flex's tiles must divide the mask's blocks: a KV tile no longer than a page.
            kernel_options = {"BLOCK_N": min(64, bs & -bs)}
        self.kernel_options = kernel_options
        dev = self.device
        # Per-step tables read by the mask functions (updated in place, never reallocated):
        # owner[blk]: the batch index of the request holding physical block blk (-1: none);
        # logical[blk]: its index in that request's table; seq[i]: request i's length;
        # dec[j]: batch index of the j-th row of a decode launch; req/shift: the request of a
        # prefill launch and its cached-context length.
        self._owner = torch.full((self.num_blocks + 1,), -1, dtype=torch.int32, device=dev)
        self._logical = torch.zeros(self.num_blocks + 1, dtype=torch.int32, device=dev)
        self._seq = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self._dec = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self._req = torch.zeros((), dtype=torch.int32, device=dev)
        self._shift = torch.zeros((), dtype=torch.int32, device=dev)
        self._zero = torch.zeros((), dtype=self.dtype, device=dev)
        owner, logical, seq, dec = self._owner, self._logical, self._seq, self._dec
        req, shift = self._req, self._shift

        # Exact on every (query, key) pair, as flex requires (eager flex evaluates them all);
        # compiled, only the partial blocks of the block mask evaluate them.
        def decode_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            blk = kv_idx // bs
            mine = owner[blk] == dec[b]
            return mine & (logical[blk] * bs + kv_idx % bs < seq[dec[b]])

        def causal_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            blk = kv_idx // bs
            return (owner[blk] == req) & (logical[blk] * bs + kv_idx % bs <= q_idx + shift)

        self._decode_mask = decode_mask
        self._causal_mask = causal_mask

    # -- views ----------------------------------------------------------------------------------
    def _kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pools as one sequence: `[1, Hkv, num_blocks * block_size, D]` views."""
        k_pool, v_pool = self.layer_kv(layer)
        h, d = self.num_kv_heads, self.head_dim
        return tuple(  # type: ignore[return-value]
            p.as_strided(
                (1, p.shape[0] * p.shape[1], h, d),
                (p.shape[0] * p.stride(0), p.stride(1), p.stride(2), 1),
            ).transpose(1, 2)
            for p in (k_pool, v_pool)
        )

    def _flex(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: BlockMask | None,
        options: dict[str, Any] | None,
    ) -> torch.Tensor:
        if mask is None:
            raise RuntimeError("paged_flex: no block mask was planned for this launch")
        flex = cast(Callable[..., Any], flex_attention)
        if q.is_cuda:
            flex = _compiled_flex((*q.stride()[1:], *k.stride(), *v.stride()))
            # A static batch and head count let flex pick its split-KV decoding kernel.
            torch._dynamo.mark_static(q, 0)
            torch._dynamo.mark_static(q, 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch")
            return flex(  # type: ignore[no-any-return]
                q, k, v, block_mask=mask, scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads, kernel_options=options,
            )  # fmt: skip

    # -- AttentionBackend -----------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tables = self.check_step(q, meta)
        k, v = self._kv(layer)
        plan = self.plan(meta, "flex", lambda: self._build_plan(meta, tables))
        for pool in (k, v):
            pool[0].transpose(0, 1).index_put_((plan.tail_rows,), self._zero)
        if meta.is_decode_only:
            return self._flex(q.unsqueeze(2), k, v, plan.decode_mask, None).squeeze(2)
        out = torch.empty_like(q)
        if plan.decode_rows is not None:
            o = self._flex(q[plan.decode_rows].unsqueeze(2), k, v, plan.decode_mask, None)
            out[plan.decode_rows] = o.squeeze(2)
        starts = self.query_starts(meta)
        for i, mask in plan.prefill_masks.items():
            a, b = starts[i], starts[i + 1]
            self._req.fill_(i)
            self._shift.fill_(meta.seq_lens_host[i] - (b - a))
            options = kernel_options(b - a, self.num_heads // self.num_kv_heads, self.q_block,
                                     self.kernel_options)  # fmt: skip
            o = self._flex(q[a:b].transpose(0, 1).unsqueeze(0), k, v, mask, options)
            out[a:b] = o.squeeze(0).transpose(0, 1)
        return out

    def _build_plan(self, meta: AttentionMetadata, tables: torch.Tensor) -> _Plan:
        """The step's owner/logical tables and block masks (device ops only for decode)."""
        batch, width = tables.shape
        if batch > self._seq.numel():
            raise ValueError(f"paged_flex was built for batches <= {self._seq.numel()} (max_batch)")
        bs, dev = self.block_size, self.device
        n_blocks = (meta.seq_lens.long() + bs - 1) // bs  # [B]
        cols = torch.arange(width, device=dev)
        sink = torch.full_like(tables, self.num_blocks)  # past-the-end entry soaks up padding
        idx = torch.where(cols < n_blocks.unsqueeze(1), tables, sink).long().flatten()
        self._owner.fill_(-1)
        self._owner.index_put_((idx,), torch.arange(batch, dtype=torch.int32, device=dev)
                               .repeat_interleave(width))  # fmt: skip
        self._logical.index_put_((idx,), cols.to(torch.int32).repeat(batch))
        self._seq[:batch].copy_(meta.seq_lens)
        # The rows past each request's length in its last block; the other rows of that
        # fixed-size index go to the same row of block 0 (the zero padding block).
        last = tables.gather(1, n_blocks.unsqueeze(1) - 1).long()  # [B, 1]
        j = torch.arange(bs, device=dev)
        past = (n_blocks.unsqueeze(1) - 1) * bs + j >= meta.seq_lens.long().unsqueeze(1)
        tail_rows = torch.where(past, last * bs + j, j).flatten()
        kv_len = self.num_blocks * bs
        decode = [i for i, n in enumerate(meta.query_lens_host) if n == 1]
        decode_rows = None
        if meta.is_decode_only:
            self._dec[:batch].copy_(torch.arange(batch, dtype=torch.int32, device=dev))
            dec_tables, dec_blocks = tables, n_blocks
        elif decode:
            starts = self.query_starts(meta)
            dec = torch.tensor(decode, dtype=torch.int64).to(dev)
            decode_rows = torch.tensor([starts[i] for i in decode], dtype=torch.int64).to(dev)
            self._dec[: len(decode)].copy_(dec)
            dec_tables, dec_blocks = tables[dec], n_blocks[dec]
        decode_mask = None
        if meta.is_decode_only or decode:
            # Every block partial (masked): with "full" blocks flex's decoding kernel sizes its
            # KV splits by the whole pool, not by the request, and loses its split-K.
            decode_mask = _block_mask(
                dec_blocks.unsqueeze(1),
                dec_tables.unsqueeze(1),
                None,
                (self.q_block, bs),
                self._decode_mask,
                (1, kv_len),
            )
        prefill_masks = {
            i: self._prefill_mask(tables[i], n, meta.seq_lens_host[i])
            for i, n in enumerate(meta.query_lens_host)
            if n > 1
        }
        return _Plan(tail_rows, decode_mask, decode_rows, prefill_masks)

    def _prefill_mask(self, table: torch.Tensor, n: int, seq_len: int) -> BlockMask:
        """Causal block mask of one request's `n` queries at the end of its `seq_len` keys."""
        bs, qb, dev = self.block_size, self.q_block, self.device
        ctx, n_blocks = seq_len - n, -(-seq_len // bs)
        blocks = table[:n_blocks].long()
        rows = torch.arange(-(-n // qb), device=dev)
        last_row = torch.clamp((rows + 1) * qb, max=n) - 1
        count = (ctx + last_row) // bs + 1  # logical kv blocks some row of the q block sees
        full = torch.minimum((ctx + rows * qb + 1) // bs, count)  # seen whole by every row
        cols = torch.arange(n_blocks, device=dev)
        partial = torch.clamp(full.unsqueeze(1) + cols.unsqueeze(0), max=n_blocks - 1)
        return _block_mask(
            (count - full).unsqueeze(0),
            blocks[partial].unsqueeze(0),
            (full.unsqueeze(0), blocks.expand(rows.numel(), -1).unsqueeze(0)),
            (qb, bs),
            self._causal_mask,
            (n, self.num_blocks * bs),
        )
