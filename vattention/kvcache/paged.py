"""`PagedKVCache`: the PagedAttention baseline (what vLLM does), with `VirtualKVCache`'s slot API.

Per layer, K and V are block pools `[num_blocks, block_size, kv_heads, head_dim]`, allocated up
front (the whole budget, as vLLM does); request tokens live in the blocks its block table lists,
in order: token `p` of a slot is at `pool[table[p // block_size], p % block_size]`. Kernels must
follow the table (the `paged_*` attention backends); writes use `block * block_size + offset`.

Invariants (checked by `check_integrity`): the pools are created zero-filled (every row finite
until written); block 0 is the padding block, never handed out and zero-filled (padding rows of
block tables and CUDA graphs point at it); every other block is free, or in exactly one used
slot's table, or a prefix block (`cache_pages`: block-level prefix caching, vLLM's way, with
`VirtualKVCache`'s API), which any number of tables may list and which is freed only once the
prefix table drops it (LRU, when blocks run short) and no table lists it; a used slot's table covers its length
(`len(table) * block_size >= length`); `ensure`/`step` are all-or-nothing (`OutOfKVMemory` leaves
every table, length and the free list as they were); `free_slot` returns the slot's blocks at
once; shrinking a length keeps the blocks (as `VirtualKVCache` keeps its pages mapped).
Sizing: `num_blocks` counts the padding block; `budget_bytes` buys `budget // block_bytes`
usable blocks (capped at what `max_slots` full slots need) plus the padding block.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from vattention.kvcache.block_allocator import BlockAllocator
from vattention.kvcache.prefix import PrefixTable
from vattention.kvcache.spec import KVCacheSpec, Lengths, normalize_lengths
from vattention.memory.errors import OutOfKVMemory


@dataclass(frozen=True)
class PagedStats:
    """A snapshot of the paged cache's memory use (sizes in bytes, K and V of all layers)."""

    block_size: int
    block_bytes: int
    num_blocks: int  # usable blocks (the padding block excluded)
    free_blocks: int
    used_blocks: int
    allocated_bytes: int  # the whole pool, padding block included: reserved up front
    used_bytes: int  # blocks held by used slots
    live_bytes: int  # bytes holding the live tokens of used slots
    live_tokens: int
    slots_used: int
    slots_free: int
    # Block-level prefix caching: blocks in the prefix table, those no table lists (evictable),
    # the bytes extra table entries of shared blocks would have cost as copies, blocks hit.
    prefix_bytes: int = 0
    prefix_idle_bytes: int = 0
    shared_saved_bytes: int = 0
    prefix_hit_pages: int = 0

    @property
    def internal_fragmentation(self) -> float:
        """Share of the held blocks' bytes that hold no live token."""
        return 0.0 if self.used_bytes == 0 else 1.0 - self.live_bytes / self.used_bytes

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = dict(asdict(self))
        d["internal_fragmentation"] = self.internal_fragmentation
        return d


class PagedKVCache:
    """Block pools plus per-slot block tables, grown block by block from a free list."""

    def __init__(
        self,
        spec: KVCacheSpec,
        block_size: int = 16,
        *,
        num_blocks: int | None = None,
        budget_bytes: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(spec, KVCacheSpec):
            raise TypeError(f"spec must be a KVCacheSpec, got {type(spec).__name__}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if num_blocks is not None and budget_bytes is not None:
            raise ValueError("give num_blocks or budget_bytes, not both")
        self.spec = spec
        self.block_size = block_size
        self.device = torch.device(device)
        self.block_bytes = block_size * spec.token_bytes
        self.blocks_per_slot = -(-spec.max_seq_len // block_size)
        full = spec.max_slots * self.blocks_per_slot
        if budget_bytes is not None:
            if not isinstance(budget_bytes, int) or budget_bytes < 0:
                raise ValueError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
            num_blocks = min(budget_bytes // self.block_bytes, full) + 1
        elif num_blocks is None:
            num_blocks = full + 1
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 2:
            raise ValueError(
                f"need at least 2 blocks (block 0 is the padding block), got {num_blocks!r}"
            )
        self.num_blocks = num_blocks
        self._alloc = BlockAllocator(num_blocks, reserved=1)
        shape = (spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        # Zero-filled, so every block holds finite values from the start: a kernel that loads a
        # whole tile and weights masked rows by zero (eager FlexAttention reads every block of
        # the pool) must never meet uninitialized NaN/Inf (0 * NaN = NaN).
        self._k = torch.zeros(shape, dtype=spec.dtype, device=self.device)
        self._v = torch.zeros(shape, dtype=spec.dtype, device=self.device)
        n = spec.max_slots
        self._tables: list[list[int]] = [[] for _ in range(n)]
        # The same tables as one host array, padded with block 0 (kept in step with `_tables`):
        # a step's tables are one fancy index of it (`block_table_array`), no Python per entry.
        self._table_array = np.zeros((n, -(-spec.max_seq_len // block_size)), dtype=np.int32)
        self._lengths = [0] * n
        self._used = [False] * n
        self._error: OutOfKVMemory | None = None
        self._closed = False
        self._prefix = PrefixTable()  # key -> (block,)
        self._refs: dict[int, int] = {}  # prefix block -> tables listing it

    # -- tensors ----------------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        """K pool of `layer`: `[num_blocks, block_size, kv_heads, head_dim]` (contiguous)."""
        self._check_layer(layer)
        return self._k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._v[layer]

    # -- slots ------------------------------------------------------------------------------
    def alloc_slot(self, prefix: Sequence[Hashable] = (), tokens: int | None = None) -> int:
        """The lowest free slot (empty table, length 0); `OutOfKVMemory` when all are used.
        With `prefix` (block keys, all cached), its table starts with their blocks, as
        `map_cached`. (`tokens`, the request's size, changes nothing here: every free slot
        holds no block.)"""
        self._check_open()
        if prefix and self._prefix.match(prefix) < len(prefix):
            raise ValueError("alloc_slot: not every prefix key has a cached block")
        for s, used in enumerate(self._used):
            if not used:
                self._used[s] = True
                self._lengths[s] = 0
                if prefix:
                    self.map_cached(s, prefix)
                return s
        raise OutOfKVMemory(f"no free slot: all {self.spec.max_slots} slots are in use")

    def free_slot(self, slot: int) -> None:
        """Give a slot back and return its blocks to the free list at once (a prefix block
        stays with the prefix table)."""
        self._check_slot(slot)
        own = []
        for b in self._tables[slot]:
            if b in self._refs:
                self._refs[b] -= 1
            else:
                own.append(b)
        self._alloc.free(own)
        self._table_array[slot, : len(self._tables[slot])] = 0
        self._tables[slot] = []
        self._lengths[slot] = 0
        self._used[slot] = False

    @property
    def num_free_slots(self) -> int:
        return self._used.count(False)

    @property
    def num_free_blocks(self) -> int:
        return self._alloc.num_free

    def length(self, slot: int) -> int:
        self._check_slot(slot)
        return self._lengths[slot]

    def block_table(self, slot: int) -> list[int]:
        """A copy of `slot`'s block table (logical block i -> physical block)."""
        self._check_slot(slot)
        return list(self._tables[slot])

    def block_tables(self, slots: Sequence[int]) -> list[list[int]]:
        """The tables of `slots`, in order. Read-only views: copy before changing them."""
        for s in slots:
            self._check_slot(s)
        return [self._tables[s] for s in slots]

    def block_table_array(self, slots: Sequence[int]) -> np.ndarray:
        """`[len(slots), ceil(max_seq_len / block_size)]` int32 tables of `slots` (a copy),
        padded with block 0 (the padding block)."""
        for s in slots:
            self._check_slot(s)
        return self._table_array[list(slots)]

    # -- prefix caching ---------------------------------------------------------------------
    @property
    def tokens_per_page(self) -> int:
        """Tokens of one block: the unit of prefix caching here."""
        return self.block_size

    def cached_prefix(self, keys: Sequence[Hashable]) -> int:
        """How many leading block keys the prefix table holds (nothing changes)."""
        return self._prefix.match(keys)

    def shared_prefix(self, slots: Sequence[int]) -> tuple[int, list[int]] | None:
        """The largest group of `slots` (used) whose tables start with the same blocks, for
        cascade decoding: (tokens of the blocks all of them list first, positions in `slots`
        of the members), or None where no two share a first block. Shared blocks are full
        prefix blocks; the run stops at the first block that differs or that a member lacks."""
        if len(slots) < 2:
            return None
        tables = self._table_array[list(slots)]
        firsts, counts = np.unique(tables[:, 0], return_counts=True)
        real = firsts != 0  # block 0: the padding block (a slot with no block)
        if not real.any() or counts[real].max() < 2:
            return None
        first = firsts[real][counts[real].argmax()]
        members: list[int] = np.flatnonzero(tables[:, 0] == first).tolist()
        group = tables[members]
        same = (group == group[0]).all(axis=0) & (group[0] != 0)
        run = int(same.argmin()) if not same.all() else same.size
        own = min(len(self._tables[slots[i]]) for i in members)
        return min(run, own) * self.block_size, members

    def map_cached(self, slot: int, keys: Sequence[Hashable]) -> int:
        """List the cached blocks of `keys` (all cached) first in the table of `slot`, a used
        slot with no token; returns the tokens they hold, now its length."""
        self._check_slot(slot)
        if self._lengths[slot] or self._tables[slot]:
            raise ValueError(f"slot {slot} already holds blocks")
        if self._prefix.match(keys) < len(keys):
            raise ValueError("map_cached: not every key has a cached block")
        blocks = [row[0] for row in self._prefix.rows(keys)]
        for b in blocks:
            self._refs[b] += 1
        self._tables[slot] = blocks
        self._table_array[slot, : len(blocks)] = blocks
        self._lengths[slot] = len(blocks) * self.block_size
        return self._lengths[slot]

    def cache_pages(self, slot: int, keys: Sequence[Hashable], start: int = 0) -> int:
        """Publish the first `len(keys)` blocks of used `slot` (each full of final tokens)
        under `keys`; keys already cached are left as they are. Returns how many were added.
        `start`: the first `start` blocks are known to be published already (not looked at)."""
        self._check_slot(slot)
        if len(keys) * self.block_size > self._lengths[slot]:
            raise ValueError(
                f"slot {slot}: {len(keys)} blocks asked, but only "
                f"{self._lengths[slot] // self.block_size} are full of live tokens"
            )
        if not 0 <= start <= len(keys):
            raise ValueError(f"start {start} is not within the {len(keys)} keys")
        added = 0
        table = self._tables[slot]
        for key, b in zip(keys[start:], table[start : len(keys)], strict=False):
            if key in self._prefix or b in self._refs:
                continue
            self._prefix.add(key, (b,))
            self._refs[b] = 1
            added += 1
        return added

    def _idle_blocks(self) -> int:
        return sum(1 for n in self._refs.values() if n == 0)

    def _evict(self, need: int) -> None:
        """Free least recently used prefix blocks no table lists until `need` are back."""
        freed: list[int] = []
        for key, (b,) in self._prefix.lru():
            if len(freed) >= need:
                break
            if self._refs[b]:
                continue
            self._prefix.pop(key)
            del self._refs[b]
            freed.append(b)
        self._alloc.free(freed)

    # -- backing ----------------------------------------------------------------------------
    def ensure(self, slot: int, num_tokens: int) -> None:
        """Back tokens `[0, num_tokens)` of `slot`, or raise `OutOfKVMemory` (nothing changed)."""
        self.step({slot: num_tokens})

    def step(self, lengths: Lengths) -> None:
        """Batched `ensure` (a mapping slot -> tokens, or one length per slot); all-or-nothing."""
        targets = self._normalize(lengths)
        growth = self._growth(targets)
        need = sum(growth.values())
        short = need - self._alloc.num_free
        if short > 0 and short <= self._idle_blocks():  # idle prefix blocks go last
            self._evict(short)
        blocks = self._alloc.allocate(need)
        at = 0
        for s, k in growth.items():
            if k:
                held = len(self._tables[s])
                self._tables[s].extend(blocks[at : at + k])
                self._table_array[s, held : held + k] = blocks[at : at + k]
            at += k
        for s, n in targets.items():
            self._lengths[s] = n

    def step_async(self, lengths: Lengths, reserve: Sequence[int] = ()) -> None:
        """`step` now (block allocation is host bookkeeping: nothing to overlap); a shortage
        is kept and raised by `wait()`, as `VirtualKVCache` raises its background errors.
        `reserve` (tokens of the requests expected next) is accepted for API parity and
        ignored: blocks are taken when a request is admitted, as vLLM does."""
        del reserve
        self.wait()
        try:
            self.step(lengths)
        except OutOfKVMemory as err:
            self._error = err

    def wait(self, interrupt: bool = True) -> None:
        """Raise the shortage kept by `step_async`, if any (`interrupt`: API parity)."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def can_fit(self, lengths: Lengths) -> bool:
        """Whether `step(lengths)` would succeed now (nothing is changed)."""
        need = sum(self._growth(self._normalize(lengths)).values())
        return need <= self._alloc.num_free + self._idle_blocks()

    def _growth(self, targets: dict[int, int]) -> dict[int, int]:
        bs = self.block_size
        grow = {s: -(-n // bs) - len(self._tables[s]) for s, n in targets.items()}
        return {s: k for s, k in grow.items() if k > 0}

    def _normalize(self, lengths: Lengths) -> dict[int, int]:
        self._check_open()
        return normalize_lengths(lengths, self.spec, self._used, self._check_slot)

    # -- accounting -------------------------------------------------------------------------
    def stats(self) -> PagedStats:
        used = [s for s in range(self.spec.max_slots) if self._used[s]]
        live = sum(self._lengths[s] for s in used)
        held = sum(len(self._tables[s]) for s in used)
        return PagedStats(
            block_size=self.block_size,
            block_bytes=self.block_bytes,
            num_blocks=self._alloc.capacity,
            free_blocks=self._alloc.num_free,
            used_blocks=held,
            allocated_bytes=self.num_blocks * self.block_bytes,
            used_bytes=held * self.block_bytes,
            live_bytes=live * self.spec.token_bytes,
            live_tokens=live,
            slots_used=len(used),
            slots_free=self.spec.max_slots - len(used),
            prefix_bytes=len(self._refs) * self.block_bytes,
            prefix_idle_bytes=self._idle_blocks() * self.block_bytes,
            shared_saved_bytes=sum(max(0, n - 1) for n in self._refs.values()) * self.block_bytes,
            prefix_hit_pages=self._prefix.hits,
        )

    def check_integrity(self) -> None:
        """Raise `RuntimeError` listing every broken invariant (see the module docstring)."""
        problems = self._alloc.check()
        held = [b for t in self._tables for b in t]
        own = [b for b in held if b not in self._refs]
        if len(set(own)) != len(own):
            problems.append("a block outside the prefix table is in two tables (or twice in one)")
        counts = {b: 0 for b in self._refs}
        for b in held:
            if b in counts:
                counts[b] += 1
        if counts != self._refs:
            problems.append("prefix blocks' reference counts differ from the tables")
        if sorted(set(held) | set(self._refs)) != [
            b for b in range(self.num_blocks) if self._alloc.is_held(b)
        ]:
            problems.append("the tables and the allocator disagree on the held blocks")
        for s in range(self.spec.max_slots):
            if len(self._tables[s]) * self.block_size < self._lengths[s]:
                problems.append(f"slot {s}: its table is shorter than its length")
            if not self._used[s] and (self._tables[s] or self._lengths[s]):
                problems.append(f"free slot {s} still holds blocks or tokens")
            row, n = self._table_array[s], len(self._tables[s])
            if row[:n].tolist() != self._tables[s] or row[n:].any():
                problems.append(f"slot {s}: its table array differs from its table")
        if problems:
            raise RuntimeError("paged KV cache integrity: " + "; ".join(problems))

    # -- checks and teardown ----------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the KV cache is closed")

    def _check_slot(self, slot: int) -> None:
        self._check_open()
        top = self.spec.max_slots
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < top:
            raise ValueError(f"slot {slot!r} is out of range [0, {top})")
        if not self._used[slot]:
            raise ValueError(f"slot {slot} is not allocated (freed twice, or never allocated?)")

    def _check_layer(self, layer: int) -> None:
        self._check_open()
        if not isinstance(layer, int) or not 0 <= layer < self.spec.num_layers:
            raise ValueError(f"layer {layer!r} is out of range [0, {self.spec.num_layers})")

    def close(self) -> None:
        """Drop the pools (idempotent); every later call but `close` raises."""
        self._closed = True
        self._k = self._v = torch.empty(0)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> PagedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
