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

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch

T = TypeVar("T")


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
    # A fixed-shape decode/prefill cut of a mixed step (`mixed.MixedPlan`), set only for steps
    # run as CUDA graphs: backends that support it then read no host list.
    mixed: Any = None
    # Decode-only steps: a prefix some rows share (`decode_kernels.SharedPrefix`, device
    # tensors), attended once for all of them by backends with `supports_cascade`.
    prefix: Any = None

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
        block_tables: Sequence[Sequence[int]] | np.ndarray | None = None,
        block_size: int = 0,
    ) -> AttentionMetadata:
        """Build the metadata of one step: host lists -> device tensors.

        Vectorised (numpy): the per-token fields cost no Python work per token. Every field is
        written into one fresh host buffer (pinned when copying to CUDA), which goes to the
        device in one non-blocking copy; the fields are views of the device copy. Nothing here
        waits for queued GPU work."""
        n = len(slots)
        if not (n == len(context_lens) == len(query_lens)) or not n:
            raise ValueError(
                "slots, context_lens and query_lens must be non-empty and equal length"
            )
        slots_host = list(slots)
        if len(set(slots_host)) != n:
            raise ValueError(f"a slot appears twice in one batch: {slots_host}")
        query_lens_host = list(query_lens)
        slot = np.array(slots_host, dtype=np.int64).reshape(n)
        ctx = np.array(context_lens, dtype=np.int64).reshape(n)
        qlen = np.array(query_lens_host, dtype=np.int64).reshape(n)
        if ctx.min() < 0 or qlen.min() < 1:
            i = int(np.flatnonzero((ctx < 0) | (qlen < 1))[0])
            raise ValueError(
                f"need context_len >= 0 and query_len >= 1, got {context_lens[i]}, {query_lens[i]}"
            )
        paged = block_tables is not None
        if paged and block_size <= 0:
            raise ValueError("block_size must be given with block_tables")
        seq = ctx + qlen
        num_tokens = int(qlen.sum())
        width = 0
        array = block_tables if isinstance(block_tables, np.ndarray) else None  # padded `[n, W]`
        if block_tables is not None:
            if len(block_tables) != n:
                raise ValueError(f"got {len(block_tables)} block tables for {n} requests")
            if array is not None:  # rows padded to one width: count the blocks each one needs
                table_lens = -(-seq // block_size)
                if array.ndim != 2 or array.shape[1] < table_lens.max():
                    raise ValueError(
                        f"block table array of shape {array.shape} is too narrow for "
                        f"{int(seq.max())} tokens in blocks of {block_size}"
                    )
            else:
                table_lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=n)
            width = max(1, int(table_lens.max()))
            short = np.flatnonzero(table_lens * block_size < seq)
            if short.size:
                i = int(short[0])
                raise ValueError(
                    f"request {i}: its block table has {int(table_lens[i])} blocks of"
                    f" {block_size} tokens, too few for {int(seq[i])} tokens"
                )

        # One host buffer, seen as int32, holds every field (an int64 field takes two int32
        # elements), each starting on a 16-byte boundary; `split` cuts the device copy back up.
        sizes = [2 * num_tokens, 2 * num_tokens, 2 * num_tokens if paged else 0]
        sizes += [n, n + 1, n, n, n * width]
        pieces: list[int] = []  # split sizes: each field, then its padding
        at: list[int] = []  # where each field starts
        pos = 0
        for size in sizes:
            at.append(pos)
            pad = -size % 4
            pieces += [size, pad]
            pos += size + pad
        dev = torch.device(device)
        pin = dev.type == "cuda" and torch.cuda.is_available()
        host = torch.empty(pos, dtype=torch.int32, pin_memory=pin)
        h32 = host.numpy()
        h64 = h32.view(np.int64)  # every int64 field starts at an even int32 index

        def field32(k: int) -> np.ndarray:
            return h32[at[k] : at[k] + sizes[k]]

        def field64(k: int) -> np.ndarray:
            return h64[at[k] // 2 : (at[k] + sizes[k]) // 2]

        tok_slots, positions, mapping = field64(0), field64(1), field64(2)
        starts = field32(4)
        starts[0] = 0
        np.cumsum(qlen, out=starts[1:])
        if num_tokens == n:  # decode only: one token per row
            row_of_token = None
            positions[:] = ctx
            tok_slots[:] = slot
        else:
            # Token t of row i (rows starts[i]:starts[i+1]) sits at context_lens[i] + t - starts[i].
            row_of_token = np.repeat(np.arange(n), qlen)
            np.subtract(np.arange(num_tokens), (starts[:-1] - ctx)[row_of_token], out=positions)
            np.take(slot, row_of_token, out=tok_slots)
        field32(3)[:] = slot
        field32(5)[:] = seq
        field32(6)[:] = ctx
        if block_tables is not None:
            table = field32(7).reshape(n, width)
            if array is not None:
                table[:] = array[:, :width]
            else:
                table.fill(0)
                flat = np.fromiter(
                    itertools.chain.from_iterable(block_tables),
                    dtype=np.int64,
                    count=int(table_lens.sum()),
                )
                table[np.arange(width) < table_lens[:, None]] = flat
            rows = np.arange(n) if row_of_token is None else row_of_token
            np.multiply(table[rows, positions // block_size], block_size, out=mapping)
            mapping += positions % block_size

        parts = host.to(dev, non_blocking=True).split(pieces)
        return cls(
            slots=parts[6],
            query_start_loc=parts[8],
            seq_lens=parts[10],
            context_lens=parts[12],
            token_slots=parts[0].view(torch.int64),
            token_positions=parts[2].view(torch.int64),
            max_query_len=int(qlen.max()),
            max_seq_len=int(seq.max()),
            slots_host=slots_host,
            query_lens_host=query_lens_host,
            seq_lens_host=seq.tolist(),
            block_tables=parts[14].view(n, width) if paged else None,
            slot_mapping=parts[4].view(torch.int64) if paged else None,
            block_size=block_size,
        )


class AttentionBackend(ABC):
    """Writes new K/V into a cache and computes causal attention over each request's cache.

    Shapes: q `[T, num_heads, head_dim]`, k and v `[T, num_kv_heads, head_dim]`; output
    `[T, num_heads, head_dim]`. `num_heads` is a multiple of `num_kv_heads` (GQA).
    """

    name: ClassVar[str] = "base"
    paged: ClassVar[bool] = False  # reads a paged cache (block tables), not a contiguous one
    decode_only: ClassVar[bool] = False  # runs only batches of one new token per request

    @property
    def supports_decode_graphs(self) -> bool:
        """Whether a decode-only step can run as a captured CUDA graph: the backend reads the
        batch from the metadata's device tensors only (and the host ints `max_query_len`,
        `max_seq_len`), never from its host lists, which a captured step fills with padding
        (`cuda_graphs.DecodeGraphs`). False unless a backend says otherwise."""
        return False

    @property
    def supports_cascade(self) -> bool:
        """Whether decode-only steps use `AttentionMetadata.prefix` (cascade decoding); a
        backend without it reads every row's own pages and ignores the field."""
        return False

    # `kv_write.write_rows` where it applies to this backend's tensors, else False (see
    # `row_writer`); None until the first write
    _row_writer: Callable[..., None] | bool | None = None

    def row_writer(self, *tensors: torch.Tensor) -> Callable[..., None] | None:
        """The one-launch K and V row writer (`kv_write`) if Triton runs on these tensors'
        device and their rows are unit-stride, else None (the caller keeps torch's index ops).
        Decided at the first write: a backend's K/V inputs and cache views keep their layout."""
        if self._row_writer is None:
            try:
                from vattention.attention.kv_write import writer_for
            except ImportError:  # no Triton
                self._row_writer = False
            else:
                self._row_writer = writer_for(*tensors) or False
        return self._row_writer if callable(self._row_writer) else None

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
        self.device = torch.device("cpu")  # subclasses set the cache's device and dtype
        self.dtype = torch.float32
        self._plan_meta: AttentionMetadata | None = None
        self._plan_capturing = False
        self._plans: dict[Any, Any] = {}

    # -- helpers shared by the contiguous and paged sides ------------------------------------
    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k_cache(layer), self.cache.v_cache(layer)

    def plan(self, meta: AttentionMetadata, key: Any, build: Callable[[], T]) -> T:
        """`build()` once per (step metadata object, key); later layers reuse the value.

        A CUDA-graph capture rebuilds it once even for a metadata object seen in the warm-up,
        so that device work done by `build` (e.g. offsets from `meta.slots`) is recorded in
        the graph and redone at every replay, not frozen at the warm-up's values."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if meta is not self._plan_meta or capturing != self._plan_capturing:
            self._plan_meta = meta
            self._plan_capturing = capturing
            self._plans = {}
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]  # type: ignore[no-any-return]

    def query_starts(self, meta: AttentionMetadata) -> list[int]:
        """Host copy of `meta.query_start_loc` (built once per step)."""

        def build() -> list[int]:
            starts = [0]
            for n in meta.query_lens_host:
                starts.append(starts[-1] + n)
            return starts

        return self.plan(meta, "query_starts", build)

    def check_q_common(self, q: torch.Tensor, meta: AttentionMetadata) -> None:
        """q's shape `[tokens, heads, head_dim]`, dtype and device against this backend."""
        expected = (meta.num_tokens, self.num_heads, self.head_dim)
        if tuple(q.shape) != expected:
            raise ValueError(
                f"q must be [tokens, heads, head_dim] = {expected}, got {tuple(q.shape)}"
            )
        if q.dtype != self.dtype:
            raise TypeError(f"q dtype {q.dtype} differs from the cache dtype {self.dtype}")
        if q.device != self.device:
            raise ValueError(f"q is on {q.device} but the cache is on {self.device}")

    def check_new_kv(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """The new K and V rows must be `[tokens, kv_heads, head_dim]`."""
        expected = (meta.num_tokens, self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(
                f"k and v must be [tokens, kv_heads, head_dim] = {expected}, "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )

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
