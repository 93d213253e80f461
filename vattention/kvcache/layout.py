"""Where each token of each layer lives in the reserved virtual range.

The range holds `num_buffers` equal buffers, each `[max_slots, slot_bytes]`:
- cross_layer: 2 buffers (K, V), each `[slots, max_len, layers, heads, dim]`; layer i is the
  strided view `buf[:, :, i]`. A page then holds whole tokens of every layer;
- cross_layer_kv: 1 buffer `[slots, max_len, 2, layers, heads, dim]`; K of layer i is
  `buf[:, :, 0, i]`, V `buf[:, :, 1, i]`. A page holds K and V of every layer of its tokens:
  half the tokens of a cross_layer page (16 of Llama-3-8B at 2 MiB, vLLM's block size), and
  one map call per page-step;
- per_layer: 2 x layers buffers (K0, V0, K1, V1, ...), each `[slots, max_len, heads, dim]`.

Invariants: `slot_bytes` is a multiple of the page size, so every slot starts on a page and
its pages are never shared with another slot; page p of a slot covers the same token range in
every buffer, so one count (`pages mapped`) describes a slot's backing in all buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from vattention.kvcache.spec import KVCacheSpec


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CacheLayout:
    spec: KVCacheSpec
    page_size: int

    @cached_property  # derived once: the host asks for these per page
    def num_buffers(self) -> int:
        return {"cross_layer": 2, "cross_layer_kv": 1}.get(
            self.spec.layout, 2 * self.spec.num_layers
        )

    @cached_property
    def buffer_token_bytes(self) -> int:
        """Bytes one token occupies in one buffer."""
        s = self.spec
        per_layer = s.layer_token_bytes
        if s.layout == "cross_layer_kv":
            return 2 * per_layer * s.num_layers
        return per_layer * s.num_layers if s.layout == "cross_layer" else per_layer

    @cached_property
    def pages_per_slot(self) -> int:
        return _ceil_div(self.spec.max_seq_len * self.buffer_token_bytes, self.page_size)

    @cached_property
    def slot_bytes(self) -> int:
        return self.pages_per_slot * self.page_size

    @cached_property
    def buffer_bytes(self) -> int:
        return self.slot_bytes * self.spec.max_slots

    @cached_property
    def total_bytes(self) -> int:
        return self.buffer_bytes * self.num_buffers

    @cached_property
    def tokens_per_page(self) -> float:
        return self.page_size / self.buffer_token_bytes

    def pages_for(self, num_tokens: int) -> int:
        """Pages (per buffer) that back a slot's first `num_tokens` tokens."""
        return _ceil_div(num_tokens * self.buffer_token_bytes, self.page_size)

    def page_offset(self, buffer: int, slot: int, page: int) -> int:
        """Byte offset of page `page` of `slot` in buffer `buffer` from the range base."""
        return buffer * self.buffer_bytes + slot * self.slot_bytes + page * self.page_size

    def views(self, raw: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer K and V views `[slots, max_len, heads, dim]` over the raw byte tensor."""
        s = self.spec
        es = s.element_size
        flat = raw.view(s.dtype)
        slot_stride = self.slot_bytes // es
        buf_elems = self.buffer_bytes // es
        hd = s.num_kv_heads * s.head_dim
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        if s.layout == "cross_layer_kv":
            shape6 = (s.max_slots, s.max_seq_len, 2, s.num_layers, s.num_kv_heads, s.head_dim)
            strides6 = (slot_stride, 2 * s.num_layers * hd, s.num_layers * hd, hd, s.head_dim, 1)
            kv_all = flat.as_strided(shape6, strides6, 0)
            for layer in range(s.num_layers):
                ks.append(kv_all[:, :, 0, layer])
                vs.append(kv_all[:, :, 1, layer])
        elif s.layout == "cross_layer":
            shape = (s.max_slots, s.max_seq_len, s.num_layers, s.num_kv_heads, s.head_dim)
            strides = (slot_stride, s.num_layers * hd, hd, s.head_dim, 1)
            k_all = flat.as_strided(shape, strides, 0)
            v_all = flat.as_strided(shape, strides, buf_elems)
            for layer in range(s.num_layers):
                ks.append(k_all[:, :, layer])
                vs.append(v_all[:, :, layer])
        else:
            shape4 = (s.max_slots, s.max_seq_len, s.num_kv_heads, s.head_dim)
            strides4 = (slot_stride, hd, s.head_dim, 1)
            for layer in range(s.num_layers):
                ks.append(flat.as_strided(shape4, strides4, (2 * layer) * buf_elems))
                vs.append(flat.as_strided(shape4, strides4, (2 * layer + 1) * buf_elems))
        return ks, vs
