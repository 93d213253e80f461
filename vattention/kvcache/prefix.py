"""The prefix table of a `VirtualKVCache`: physical pages kept by key for zero-copy sharing.

A key names the contents of one page-sized block of a sequence's KV (the engine uses a hash
chain over the token ids up to the block's end, so equal keys mean equal prefixes). The table
holds a *row* per key: the physical page of that block in every buffer (K and V, or every
layer's). The cache maps a row at any slot's page index to share it: the same physical memory
at several virtual addresses, read in place by unmodified kernels, never copied.

A key's row may be *retired* (`retire`): the key then names another row holding a copy of
the same tokens (a prefix segment's: `segments.py`), and the old row's handles stay *held*
(nobody writes into them: slots still map them) but are no longer found by key; the cache
lets each go once no slot maps it (`drop_retired`). A row's handles may be page handles or
a segment's row ids: the table does not tell them apart.

Invariants (the cache keeps them; `check_integrity` verifies):
- a row in the table holds whole, final tokens: nobody writes into a page while it is here;
- a handle is in at most one row, and a row's handles are pooled only once the row is evicted
  (or retired) and no slot maps them;
- `order` lists every key, least recently used first (`touch` on every hit or publish).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Sequence


class PrefixTable:
    """Key -> row of physical page handles (one per buffer), in LRU order."""

    def __init__(self) -> None:
        self._rows: OrderedDict[Hashable, tuple[int, ...]] = OrderedDict()
        self._owner: dict[int, Hashable] = {}  # handle -> its row's key
        self._retired: dict[int, Hashable] = {}  # handle of a retired row -> its old key
        self.hits = 0  # pages served to `match` callers
        self.published = 0  # rows ever added

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._rows

    def holds(self, handle: int) -> bool:
        """Whether `handle` is in a row, current or retired (nobody may write into it)."""
        return handle in self._owner or handle in self._retired

    def owns(self, handle: int) -> bool:
        """Whether `handle` is in a current row (found by key)."""
        return handle in self._owner

    def key_of(self, handle: int) -> Hashable:
        return self._owner[handle]

    def retire(self, key: Hashable, row: Sequence[int]) -> tuple[int, ...]:
        """Make `key` name `row` (same tokens) instead; its old row's handles stay held
        (retired) until `drop_retired`. Returns the old row."""
        old = self._rows[key]
        if any(h in self._owner or h in self._retired for h in row):
            raise ValueError("a page handle is already in another row")
        for h in old:
            del self._owner[h]
            self._retired[h] = key
        self._rows[key] = tuple(row)
        for h in row:
            self._owner[h] = key
        return old

    def drop_retired(self, handle: int) -> None:
        del self._retired[handle]

    def retired(self) -> Iterable[int]:
        return iter(self._retired)

    def match(self, keys: Sequence[Hashable]) -> int:
        """How many leading `keys` have rows (no state changes)."""
        n = 0
        for key in keys:
            if key not in self._rows:
                break
            n += 1
        return n

    def rows(self, keys: Sequence[Hashable]) -> list[tuple[int, ...]]:
        """The rows of `keys` (all must be present), each touched as most recently used."""
        out = []
        for key in keys:
            out.append(self._rows[key])
            self._rows.move_to_end(key)
        self.hits += len(out)
        return out

    def add(self, key: Hashable, row: Sequence[int]) -> None:
        if key in self._rows:
            raise ValueError(f"key {key!r} already has a row")
        if any(h in self._owner for h in row):
            raise ValueError("a page handle is already in another row")
        self._rows[key] = tuple(row)
        for h in row:
            self._owner[h] = key
        self.published += 1

    def pop(self, key: Hashable) -> tuple[int, ...]:
        row = self._rows.pop(key)
        for h in row:
            del self._owner[h]
        return row

    def lru(self) -> Iterator[tuple[Hashable, tuple[int, ...]]]:
        """(key, row), least recently used first (a snapshot: safe to `pop` while iterating)."""
        return iter(list(self._rows.items()))

    def handles(self) -> Iterable[int]:
        """Handles of the current rows (not the retired ones)."""
        return self._owner.keys()

    @property
    def num_handles(self) -> int:
        """How many handles the current rows hold (O(1))."""
        return len(self._owner)
