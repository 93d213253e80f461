"""`flex`: FlexAttention over slot views of the contiguous cache, with analytic block masks.

Calls are shaped like `sdpa`'s: one call for a uniform batch (equal lengths, consecutive slots:
`cache[first:first + B, :seq_len]`), else one call per request over `cache[slot:slot+1, :seq_len]`.
The key length of every call is the request's own `seq_len`, so the kernel bounds-checks its
loads there and never reads rows past a request's length (those may be unbacked pages; a
padded `[B, max_len]` view with a length mask would read up to a block of them).
Causal prefill gets a `BlockMask` built directly from the lengths (no dense mask evaluation):
q block i sees kv blocks `[0, last_i]`, of which those wholly below the diagonal are "full"
(mask not evaluated) and the rest partial. The chunk offset is a device scalar read by one
mask function per backend, so one compiled kernel serves every length. On CUDA flex is compiled (`torch.compile`); on the CPU it
runs eagerly (unfused, for tests). Calls of more query rows per KV head (`n * group`) than a mask
q block holds force flex's main kernel: its decoding kernel has no tile for them.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from vattention.attention.base import AttentionMetadata, KVCacheView, register_backend
from vattention.attention.contiguous import ContiguousBackend, uniform_batch

BLOCK = 128
MaskMod = Callable[[Any, Any, Any, Any], Any]


def kernel_options(
    queries: int, group: int, q_block: int, options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """`options`, forcing flex's main kernel where its decoding kernel has none.

    For fewer than 128 queries Inductor picks the decoding kernel, which packs the
    `queries * group` query rows of a KV head into one tile whose height (the next power of two,
    at least 16) must divide the mask's q block; past `q_block` rows it finds no valid choice
    (torch 2.11: `NoValidChoicesError`), so ask for the main kernel instead."""
    if queries * group <= q_block:
        return options
    return {**(options or {}), "FORCE_USE_FLEX_ATTENTION": True}


def _flex_call(*args: Any, **kwargs: Any) -> Any:
    return flex_attention(*args, **kwargs)


@functools.cache
def _compiled_flex(strides: tuple[int, ...]) -> Callable[..., Any]:
    """A compiled flex for one q/K/V stride pattern, with a dynamo cache of its own.

    Dynamo keeps its compiled graphs on the traced function's code object. If caches of several
    layouts shared one, a stride change would make dynamo mark the strides symbolic, and torch
    2.11's flex template finds no kernel for symbolic K/V strides. So each pattern gets a copy
    of `_flex_call` with its own code object; sequence lengths may still vary within it."""
    code = _flex_call.__code__.replace(co_name=f"_flex_call_{abs(hash(strides))}")
    fn = types.FunctionType(code, _flex_call.__globals__, code.co_name)
    return torch.compile(fn)


def offset_causal(shift: torch.Tensor) -> MaskMod:
    """Mask `kv <= q + shift`: bottom-right causal when `shift` holds `seq_len - query_len`."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return kv_idx <= q_idx + shift

    return mask_mod


def causal_block_mask(
    query_len: int, seq_len: int, mask_mod: MaskMod, device: torch.device
) -> BlockMask:
    """Bottom-right causal `BlockMask` for `query_len` queries at the end of `seq_len` keys."""
    offset = seq_len - query_len
    q_blocks, kv_blocks = -(-query_len // BLOCK), -(-seq_len // BLOCK)
    i = torch.arange(q_blocks, device=device)
    last_row = torch.clamp((i + 1) * BLOCK, max=query_len) - 1
    count = (offset + last_row) // BLOCK + 1  # kv blocks some row of q block i sees
    full = torch.minimum((offset + i * BLOCK + 1) // BLOCK, count)  # seen whole by every row
    cols = torch.arange(kv_blocks, device=device)
    partial_idx = torch.clamp(full.unsqueeze(1) + cols.unsqueeze(0), max=kv_blocks - 1)
    full_idx = cols.unsqueeze(0).expand(q_blocks, kv_blocks)

    def i32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int32).contiguous().view(1, 1, *t.shape)

    return BlockMask.from_kv_blocks(
        i32(count - full),
        i32(partial_idx),
        i32(full),
        i32(full_idx),
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(query_len, seq_len),
    )


@register_backend
class FlexBackend(ContiguousBackend):
    """FlexAttention (compiled on CUDA) over exact-length slot views with causal block masks."""

    name = "flex"

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        # One mask function for every call (a new closure per call would recompile); the
        # chunk offset lives in a device scalar set before each masked call.
        self._shift = torch.zeros((), dtype=torch.int64, device=self.device)
        self._mask_mod = offset_causal(self._shift)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.check_q(q, meta)
        k_cache, v_cache = self.layer_kv(layer)
        u = self.plan(meta, "uniform", lambda: uniform_batch(meta))
        if u is not None:
            rows = slice(u.first_slot, u.first_slot + u.num_seqs)
            qb = q.view(u.num_seqs, u.query_len, self.num_heads, self.head_dim)
            o = self._call(qb, k_cache[rows, : u.seq_len], v_cache[rows, : u.seq_len], meta)
            return o.reshape(q.shape)
        out = torch.empty_like(q)
        starts = self.starts(meta)
        for i in range(meta.num_seqs):
            slot, seq_len = meta.slots_host[i], meta.seq_lens_host[i]
            a, b = starts[i], starts[i + 1]
            o = self._call(
                q[a:b].unsqueeze(0),
                k_cache[slot : slot + 1, :seq_len],
                v_cache[slot : slot + 1, :seq_len],
                meta,
            )
            out[a:b] = o.squeeze(0)
        return out

    def _call(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Flex on `[B, n, H, D]` queries over `[B, S, Hkv, D]` keys; returns `[B, n, H, D]`."""
        n, seq_len = q.shape[1], k.shape[1]
        mask = None
        if n > 1:
            mask = self.plan(
                meta,
                ("mask", n, seq_len),
                lambda: causal_block_mask(n, seq_len, self._mask_mod, q.device),
            )
            self._shift.fill_(seq_len - n)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*flex_attention called without torch.compile"
            )
            pattern = (*q.stride()[1:], *k.stride(), *v.stride())
            flex = (
                _compiled_flex(pattern) if q.is_cuda else cast(Callable[..., Any], flex_attention)
            )
            group = self.num_heads // self.num_kv_heads
            o = flex(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                block_mask=mask,
                scale=self.scale,
                enable_gqa=group != 1,
                kernel_options=kernel_options(n, group, BLOCK),
            )
        return o.transpose(1, 2)
