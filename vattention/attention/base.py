"""The attention-backend interface shared by models, the engine and the kernels.

One forward pass covers a batch of B requests that mixes prefill chunks (any length, possibly
continuing earlier chunks) and decode tokens (one new token each). The new tokens are flattened:
request i owns rows `query_start_loc[i]:query_start_loc[i+1]` of q, k and v.

Invariants of `AttentionMetadata` (checked by `build`):
- `seq_lens[i] = context_lens[i] + query_lens[i]` and `1 <= query_lens[i]`;
- after `write_kv`, tokens `[0, seq_lens[i])` of request i are in the cache at its slot;
- new token j of request i sits at position `context_lens[i] + j` (causal: it sees positions
  `<= context_lens[i] + j`).
The metadata is built once per step and passed explicitly to every layer: no globals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch


class KVCacheView(Protocol):
    """What a backend needs from a KV cache: per-layer K and V tensors.

    Contiguous caches return `[slots, max_seq_len, kv_heads, head_dim]`; paged caches
    `[num_blocks, block_size, kv_heads, head_dim]`.
    """

    def k_cache(self, layer: int) -> torch.Tensor: ...

    def v_cache(self, layer: int) -> torch.Tensor: ...


@dataclass
class AttentionMetadata:
    """Per-step batch description (device tensors plus host copies for launch decisions)."""

    slots: torch.Tensor  # [B] int32: cache slot of each request
    query_start_loc: torch.Tensor  # [B+1] int32: cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step's write
    context_lens: torch.Tensor  # [B] int32: tokens already cached before this step
    token_slots: torch.Tensor  # [T] int64: slot of each new token
    token_positions: torch.Tensor  # [T] int64: position of each new token in its sequence
    max_query_len: int
    max_seq_len: int
    slots_host: list[int]
    query_lens_host: list[int]
    seq_lens_host: list[int]
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, paged caches only
    slot_mapping: torch.Tensor | None = None  # [T] int64 flat (block * block_size + offset), paged
    block_size: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.slots_host)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens_host))

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        slots: Sequence[int],
        context_lens: Sequence[int],
        query_lens: Sequence[int],
        device: torch.device | str = "cpu",
        block_tables: Sequence[Sequence[int]] | None = None,
        block_size: int = 0,
    ) -> AttentionMetadata:
        """Build the metadata of one step (host lists -> device tensors, one copy each)."""
        if not (len(slots) == len(context_lens) == len(query_lens)) or not slots:
            raise ValueError(
                "slots, context_lens and query_lens must be non-empty and equal length"
            )
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one batch: {list(slots)}")
        for c, q in zip(context_lens, query_lens, strict=False):
            if c < 0 or q < 1:
                raise ValueError(f"need context_len >= 0 and query_len >= 1, got {c}, {q}")
        seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=False)]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        tok_slots: list[int] = []
        tok_pos: list[int] = []
        for s, c, q in zip(slots, context_lens, query_lens, strict=False):
            tok_slots.extend([s] * q)
            tok_pos.extend(range(c, c + q))
        dev = torch.device(device)

        def i32(x: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(x), dtype=torch.int32).to(dev, non_blocking=True)

        def i64(x: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(x), dtype=torch.int64).to(dev, non_blocking=True)

        bt = None
        mapping = None
        if block_tables is not None:
            if block_size <= 0:
                raise ValueError("block_size must be given with block_tables")
            width = max(1, max(len(row) for row in block_tables))
            rows = [list(row) + [0] * (width - len(row)) for row in block_tables]
            bt = i32([x for row in rows for x in row]).view(len(rows), width)
            flat = []
            for row, c, q in zip(block_tables, context_lens, query_lens, strict=False):
                for p in range(c, c + q):
                    flat.append(row[p // block_size] * block_size + p % block_size)
            mapping = i64(flat)
        return cls(
            slots=i32(slots),
            query_start_loc=i32(starts),
            seq_lens=i32(seq_lens),
            context_lens=i32(context_lens),
            token_slots=i64(tok_slots),
            token_positions=i64(tok_pos),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            slots_host=list(slots),
            query_lens_host=list(query_lens),
            seq_lens_host=seq_lens,
            block_tables=bt,
            slot_mapping=mapping,
            block_size=block_size,
        )


class AttentionBackend(ABC):
    """Writes new K/V into a cache and computes causal attention over each request's cache.

    Shapes: q `[T, num_heads, head_dim]`, k and v `[T, num_kv_heads, head_dim]`; output
    `[T, num_heads, head_dim]`. `num_heads` is a multiple of `num_kv_heads` (GQA).
    """

    name: ClassVar[str] = "base"
    paged: ClassVar[bool] = False

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
    ) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
            )
        self.cache = cache
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5

    @abstractmethod
    def write_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Store the new tokens' K and V at their positions in the cache."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of the new queries over each request's cached tokens."""

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        self.write_kv(layer, k, v, meta)
        return self.attend(layer, q, meta)


_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Class decorator: make a backend selectable by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend_class(name: str) -> type[AttentionBackend]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: {backend_names()}") from None
