"""`KVCacheSpec`: the shape of a KV cache, validated at construction.

Invariants: every field is positive; `layout` is one of `LAYOUTS`; `page_size`, when given, is a
power of two. A spec is frozen and hashable so it can key caches and CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

# Per-slot token counts: a mapping slot -> tokens, or one entry per slot (0 skips a free slot).
Lengths = Mapping[int, int] | Sequence[int]

LAYOUTS = ("cross_layer", "cross_layer_kv", "per_layer")

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Turn `"bf16"`/`"float16"`/... or a torch dtype into a torch dtype (clear error otherwise)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported KV dtype {dtype}; use float16, bfloat16 or float32")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class KVCacheSpec:
    """What a KV cache must hold.

    num_layers, num_kv_heads, head_dim: model shape (per tensor-parallel rank).
    max_slots: concurrent requests (batch slots); max_seq_len: tokens per slot.
    page_size: physical page bytes; None takes the backend's granularity (2 MiB on CUDA).
    layout: "cross_layer" (one K and one V tensor [slots, max_len, layers, heads, dim]),
    "cross_layer_kv" (one tensor [slots, max_len, 2, layers, heads, dim]: a page holds K and V
    of every layer, so half as many tokens, a finer granularity) or "per_layer" (one K and one
    V tensor per layer, [slots, max_len, heads, dim]).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_slots: int
    max_seq_len: int
    dtype: torch.dtype = torch.float16
    page_size: int | None = None
    layout: str = "cross_layer"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_slots", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVCacheSpec.{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.layout not in LAYOUTS:
            raise ValueError(f"KVCacheSpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
        ps = self.page_size
        if ps is not None and (not isinstance(ps, int) or ps <= 0 or ps & (ps - 1)):
            raise ValueError(f"KVCacheSpec.page_size must be a power of two, got {ps!r}")

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @cached_property
    def layer_token_bytes(self) -> int:
        """Bytes of K (or of V) for one token in one layer."""
        return self.num_kv_heads * self.head_dim * self.element_size

    @cached_property
    def token_bytes(self) -> int:
        """Bytes of K plus V for one token across all layers."""
        return 2 * self.num_layers * self.layer_token_bytes


def normalize_lengths(
    lengths: Lengths, spec: KVCacheSpec, used: Sequence[bool], check_slot: Callable[[int], None]
) -> dict[int, int]:
    """`lengths` as `{slot: tokens}`, checked: every slot in use (`check_slot` raises the
    cache's own error otherwise) and every count in `[0, max_seq_len]`. Nothing is changed."""
    if isinstance(lengths, Mapping):
        items = list(lengths.items())
    elif isinstance(lengths, Sequence):
        if len(lengths) != spec.max_slots:
            raise ValueError(
                f"a length sequence needs {spec.max_slots} entries, got {len(lengths)}"
            )
        items = [(s, n) for s, n in enumerate(lengths) if n or used[s]]
    else:
        raise TypeError(
            f"lengths must be a mapping slot->tokens or a sequence, got {type(lengths).__name__}"
        )
    out: dict[int, int] = {}
    top, max_len = spec.max_slots, spec.max_seq_len
    for s, n in items:
        # Fast path for plain ints; anything else gets the detailed checks and errors.
        if type(s) is not int or not 0 <= s < top or not used[s]:
            check_slot(s)
        if type(n) is not int or not 0 <= n <= max_len:
            raise ValueError(f"slot {s}: {n!r} tokens is outside [0, max_seq_len={max_len}]")
        out[s] = n
    return out
