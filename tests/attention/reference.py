"""A float64 reference for causal attention over whole requests, independent of any cache layout.

`reference_attention(q, keys, values, query_lens, scale)`:
- q: `[T, num_heads, head_dim]`, the new queries of B requests flattened in request order
  (request i owns the next `query_lens[i]` rows);
- keys[i], values[i]: `[seq_len_i, num_kv_heads, head_dim]`, ALL tokens of request i after this
  step (cached context followed by the new tokens), so `seq_len_i >= query_lens[i]`;
- new query j of request i sits at position `seq_len_i - query_lens[i] + j` and sees keys at
  positions `<=` that (causal, bottom-right aligned); query head h reads KV head
  `h // (num_heads // num_kv_heads)` (GQA).
Returns `[T, num_heads, head_dim]` in float64. Cache backends (contiguous or paged) are tested by
writing the same K/V into their cache and comparing against this.

`DenseKVCache` is a plain-tensor stand-in for the contiguous cache (the `KVCacheView` contract)
in four layouts: "per_layer", "cross_layer" (strided per-layer views of one tensor),
"cross_layer_kv" (K and V of every layer interleaved per token in one tensor) and
"padded" (per-layer, slot stride not a whole number of token rows). It starts filled with NaN,
so a kernel that reads a row nobody wrote (past a request's length) poisons its output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def reference_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    query_lens: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention in float64 (see the module docstring for the contract)."""
    if not (len(keys) == len(values) == len(query_lens)):
        raise ValueError("keys, values and query_lens must have one entry per request")
    if q.shape[0] != sum(query_lens):
        raise ValueError(f"q has {q.shape[0]} rows but query_lens sum to {sum(query_lens)}")
    num_heads = q.shape[1]
    out = []
    start = 0
    for k, v, n_q in zip(keys, values, query_lens, strict=True):
        seq_len, num_kv_heads = k.shape[0], k.shape[1]
        if num_heads % num_kv_heads or v.shape != k.shape or n_q > seq_len:
            raise ValueError(f"bad request shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, {n_q=}")
        group = num_heads // num_kv_heads
        qi = q[start : start + n_q].double().transpose(0, 1)  # [H, n_q, D]
        ki = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
        vi = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) * scale  # [H, n_q, S]
        q_pos = torch.arange(seq_len - n_q, seq_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out.append((scores.softmax(dim=-1) @ vi).transpose(0, 1))  # [n_q, H, D]
        start += n_q
    return torch.cat(out, dim=0)


def random_requests(
    seq_lens: Sequence[int],
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random full K and V `[seq_len_i, num_kv_heads, head_dim]` per request (values ~ N(0, 1))."""
    keys, values = [], []
    for n in seq_lens:
        shape = (n, num_kv_heads, head_dim)
        keys.append(torch.randn(shape, generator=generator).to(device=device, dtype=dtype))
        values.append(torch.randn(shape, generator=generator).to(device=device, dtype=dtype))
    return keys, values


CACHE_LAYOUTS = ("per_layer", "cross_layer", "cross_layer_kv", "padded")


class DenseKVCache:
    """K and V caches `[max_slots, max_seq_len, num_kv_heads, head_dim]` per layer, NaN-filled."""

    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layout: str = "per_layer",
    ) -> None:
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"layout must be one of {CACHE_LAYOUTS}, got {layout!r}")
        self.layout = layout
        shape = (max_slots, max_seq_len, num_kv_heads, head_dim)
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        if layout == "cross_layer_kv":
            both = torch.full(
                (max_slots, max_seq_len, 2, num_layers, num_kv_heads, head_dim),
                float("nan"), dtype=dtype, device=device,
            )  # fmt: skip
            self._k = [both[:, :, 0, i] for i in range(num_layers)]
            self._v = [both[:, :, 1, i] for i in range(num_layers)]
        for store in (self._k, self._v) if layout != "cross_layer_kv" else ():
            if layout == "cross_layer":
                full = torch.full(
                    (max_slots, max_seq_len, num_layers, num_kv_heads, head_dim),
                    float("nan"),
                    dtype=dtype,
                    device=device,
                )
                store.extend(full[:, :, i] for i in range(num_layers))
            elif layout == "per_layer":
                store.extend(
                    torch.full(shape, float("nan"), dtype=dtype, device=device)
                    for _ in range(num_layers)
                )
            else:  # padded: slot stride = max_len rows + one head_dim (16-byte aligned rows)
                row = num_kv_heads * head_dim
                slot_stride = (max_seq_len + 1) * row + head_dim
                for _ in range(num_layers):
                    flat = torch.full(
                        (max_slots * slot_stride,), float("nan"), dtype=dtype, device=device
                    )
                    strides = (slot_stride, row, head_dim, 1)
                    store.append(flat.as_strided(shape, strides))

    def k_cache(self, layer: int) -> torch.Tensor:
        return self._k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._v[layer]
