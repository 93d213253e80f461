"""Zero-copy prefix sharing for `VirtualKVCache` (a mixin: the cache's state, its methods).

`cache_pages(slot, keys)` publishes a slot's full pages in the prefix table (`prefix.py`);
`map_cached(slot, keys)` maps those same physical pages as another slot's leading pages: one
page at several virtual addresses, no copy, no block table. Pages are reference-counted by
mapping (`_acquire` / `_release`); a page goes back to the pool only when no slot maps it and
the table has dropped it (`_evict`, least recently used first, only rows no slot maps).
Invariants are those of `virtual.py` (checked by its `check_integrity`): shared pages hold
whole, final tokens and are always a slot's leading pages; nobody writes into one.

Prefix segments. The driver's cost is per mapping, not per byte (H200: granting access to one
2 MiB page or to one 256 MiB allocation both take ~31 us), so mapping a 4K-token prefix of
Llama-3-8B page by page (128 pages x K and V) costs ~14 ms an admission, while paged engines
only copy block ids. Once a prefix is *hot* (mapped by two slots or more), its pages are
copied (on the device, stream-ordered) into one allocation per buffer, a segment, and later
admissions whose prefix starts with it map the whole segment in one call per buffer. A slot's
pages stay rows of the table (`_pages` names the rows whatever backs them, so matching,
reference counts and eviction are unchanged); only the physical mapping differs:
- a slot maps at most one segment, whole (the driver maps no part of an allocation), as its
  first `_seg_pages[slot]` pages, holding references to the rows it copies (so they are not
  evicted while a slot maps it), and unmaps it whole;
- a segment's rows are all in the table; its pages count against the budget (`PagePool.hold`)
  and it is the first memory given back (`_evict`) once no slot maps it: it only duplicates.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from vattention.kvcache.layout import CacheLayout
from vattention.kvcache.pool import PagePool
from vattention.kvcache.prefix import PrefixTable
from vattention.kvcache.spec import KVCacheSpec
from vattention.memory.backend import MemoryBackend
from vattention.memory.errors import MemoryBackendError, OutOfKVMemory


@dataclass(eq=False)
class Segment:
    """One allocation per buffer holding copies of the pages of `rows` (table rows), in order."""

    rows: tuple[tuple[int, ...], ...]
    handles: tuple[int, ...]  # one per buffer, len(rows) pages each
    users: int = 0  # slots mapping it

    def match(self, rows: Sequence[tuple[int, ...]]) -> int:
        """How many leading `rows` it holds."""
        n = 0
        for a, b in zip(self.rows, rows, strict=False):
            if a != b:
                break
            n += 1
        return n


class PrefixSharing:
    """The sharing half of `VirtualKVCache` (which provides every attribute declared here)."""

    spec: KVCacheSpec
    layout: CacheLayout
    page_size: int
    _backend: MemoryBackend
    _base: int
    _lock: threading.RLock
    _pool: PagePool
    _pages: list[list[list[int]]]
    _lengths: list[int]
    _cap_tokens: list[int]
    _freed_at: list[object]
    _freed_seq: list[int]
    _table: PrefixTable
    _refs: dict[int, int]
    _idle_table_handles: int
    _used: list[bool]
    _raw: torch.Tensor
    _segments: dict[tuple[int, ...], list[Segment]]  # first row -> segments starting with it
    _seg_of: list[Segment | None]
    _seg_pages: list[int]
    segment_min_pages: int
    _map_calls: int
    _unmap_calls: int
    _access_calls: int

    def _check_slot(self, slot: int) -> None:
        raise NotImplementedError

    @property
    def tokens_per_page(self) -> int:
        """Tokens one page holds (per buffer); prefix sharing needs it whole."""
        tb = self.layout.buffer_token_bytes
        if self.page_size % tb:
            raise ValueError(
                f"prefix sharing needs whole tokens per page: a token takes {tb} bytes of a "
                f"{self.page_size}-byte page in the {self.spec.layout} layout, so shared pages "
                f"would split a token (try another kv_layout, or the paged cache, which shares "
                f"blocks of any size)"
            )
        return self.page_size // tb

    def cached_prefix(self, keys: Sequence[Hashable]) -> int:
        """How many leading page keys the prefix table holds (nothing changes)."""
        with self._lock:
            return self._table.match(keys)

    def map_cached(self, slot: int, keys: Sequence[Hashable]) -> int:
        """Map the prefix rows of `keys` (all cached) as the first pages of `slot`, a used slot
        with no live token; returns the tokens they hold, now `slot`'s length. No page is
        created or copied: the same physical pages serve every slot that maps them."""
        with self._lock:
            self._check_slot(slot)
            if self._lengths[slot]:
                raise ValueError(f"slot {slot} already holds {self._lengths[slot]} tokens")
            return self._map_rows(slot, self._cached_rows(keys, "map_cached: not every key"))

    def _cached_rows(self, keys: Sequence[Hashable], what: str) -> list[tuple[int, ...]]:
        """The rows of `keys`, or a ValueError "{what} has a cached row"."""
        if self._table.match(keys) < len(keys):
            raise ValueError(f"{what} has a cached row")
        return self._table.rows(keys)

    def _map_rows(self, slot: int, rows: list[tuple[int, ...]]) -> int:
        """Map `rows` as the first pages of `slot` (rows it already maps there stay, with
        their access), through a segment where one holds them (see the module docstring);
        its length becomes the tokens they hold. The slot's pages past the rows it keeps are
        private (`alloc_slot` unmaps shared ones first)."""
        pages = self._pages[slot]
        nbuf, ps = self.layout.num_buffers, self.page_size
        keep = 0
        while keep < min(len(pages), len(rows)) and tuple(pages[keep]) == rows[keep]:
            keep += 1
        if keep < min(len(pages), len(rows)):
            self._wait_freed(slot)  # its old pages may still be read by queued work
            for i in range(keep, min(len(pages), len(rows))):  # private pages: replaced
                for buf, h in enumerate(pages[i]):
                    self._backend.unmap(self._base + self.layout.page_offset(buf, slot, i))
                    self._unmap_calls += 1
                    self._release(h)
                pages[i] = []
        seg, through, source = None, 0, None
        if keep == 0 and not self._seg_pages[slot]:
            seg, through, source = self._segment_for(slot, rows)
        for i in range(keep, len(rows)):
            if i == len(pages):
                pages.append([])
            for buf, h in enumerate(rows[i]):
                if i >= through:
                    self._backend.map(self._base + self.layout.page_offset(buf, slot, i), h)
                    self._map_calls += 1
                self._acquire(h)
                pages[i].append(h)
        if seg is not None:
            for buf, h in enumerate(seg.handles):
                self._backend.map(self._base + self.layout.page_offset(buf, slot, 0), h)
                self._map_calls += 1
            seg.users += 1
            self._seg_of[slot], self._seg_pages[slot] = seg, through
        if keep < len(rows):
            for buf in range(nbuf):
                self._backend.set_access(
                    self._base + self.layout.page_offset(buf, slot, keep), (len(rows) - keep) * ps
                )
                self._access_calls += 1
        if seg is not None and source is not None:  # a new segment: fill it through `slot`
            self._fill_segment(seg, slot, source)
        self._cap_tokens[slot] = len(pages) * ps // self.layout.buffer_token_bytes
        self._lengths[slot] = len(rows) * self.tokens_per_page
        return self._lengths[slot]

    # -- prefix segments ------------------------------------------------------------------
    def _segment_for(
        self, slot: int, rows: list[tuple[int, ...]]
    ) -> tuple[Segment | None, int, int | None]:
        """(segment, how many leading `rows` it backs, the slot to fill it from if it is new)
        for `slot`'s new prefix: an existing segment holding exactly them, else a new one if
        they are hot (two slots map them) and memory is plentiful, else the longest existing
        one whose rows all lead `rows` (a segment is mapped whole: the driver maps no part
        of an allocation), else (None, 0, None)."""
        if not self.segment_min_pages or len(rows) < self.segment_min_pages:
            return None, 0, None
        best, most = None, 0
        for seg in self._segments.get(rows[0], ()):
            m = len(seg.rows)
            if m > most and seg.match(rows) == m:
                best, most = seg, m
        if most == len(rows):
            return best, most, None
        if self._refs.get(rows[-1][0], 0) >= 2:
            built = self._build_segment(slot, rows)
            if built is not None:
                return built[0], len(rows), built[1]
        if most >= self.segment_min_pages:
            return best, most, None
        return None, 0, None

    def _build_segment(self, slot: int, rows: list[tuple[int, ...]]) -> tuple[Segment, int] | None:
        """A new, empty segment for `rows` and a slot (not `slot`) that maps them all, to fill
        it from once `slot` maps it (`_fill_segment`); None if no slot maps them or memory is
        not plentiful (it would leave less than a tenth of the budget obtainable)."""
        n, last = len(rows), len(rows) - 1
        source = next(
            (
                s
                for s, p in enumerate(self._pages)
                if s != slot and len(p) > last and tuple(p[last]) == rows[last]
                and tuple(p[0]) == rows[0]
            ),
            None,
        )  # fmt: skip
        nbuf = self.layout.num_buffers
        if source is None or not self._pool.hold(n * nbuf, keep=self._pool.budget // 10):
            return None
        handles: list[int] = []
        try:
            for _ in range(nbuf):
                handles.append(self._backend.create_page(n))
        except (OutOfKVMemory, MemoryBackendError):
            for h in handles:
                self._backend.destroy_page(h)
            self._pool.unhold(n * nbuf)
            return None
        seg = Segment(tuple(rows), tuple(handles))
        self._segments.setdefault(rows[0], []).append(seg)
        return seg, source

    def _fill_segment(self, seg: Segment, slot: int, source: int) -> None:
        """Copy the segment's pages from its source slot into it, through `slot`'s mapping
        (a device copy on the current stream: after the writes that made the rows, before
        any step that reads `slot`). A free source keeps its pages until the copy is done."""
        nbytes = len(seg.rows) * self.page_size
        for buf in range(self.layout.num_buffers):
            dst = self.layout.page_offset(buf, slot, 0)
            src = self.layout.page_offset(buf, source, 0)
            self._raw[dst : dst + nbytes].copy_(self._raw[src : src + nbytes])
        if not self._used[source]:  # unmapping it must now wait for the copy too
            self._freed_at[source] = self._backend.record_event()

    def _unmap_segment(self, slot: int) -> int:
        """Unmap `slot`'s segment (its first pages, whole) and drop those rows from the slot;
        returns how many handles went back to the pool (none: rows stay in the table)."""
        seg, n = self._seg_of[slot], self._seg_pages[slot]
        assert seg is not None and len(self._pages[slot]) == n
        for buf in range(len(seg.handles)):
            self._backend.unmap(self._base + self.layout.page_offset(buf, slot, 0))
            self._unmap_calls += 1
        pooled = 0
        for row in self._pages[slot]:
            for h in row:
                pooled += self._release(h)
        self._pages[slot].clear()
        seg.users -= 1
        self._seg_of[slot], self._seg_pages[slot] = None, 0
        return pooled

    def _drop_idle_segments(self, need: int | None = None) -> int:
        """Destroy segments no slot maps (all, or until `need` budget pages are back);
        returns the budget pages given back."""
        back, nbuf = 0, self.layout.num_buffers
        for first, segs in list(self._segments.items()):
            for seg in list(segs):
                if need is not None and back >= need:
                    return back
                if seg.users:
                    continue
                for h in seg.handles:
                    self._backend.destroy_page(h)
                self._pool.unhold(len(seg.rows) * nbuf)
                back += len(seg.rows) * nbuf
                segs.remove(seg)
            if not segs:
                del self._segments[first]
        return back

    def _segment_pages(self, only_reclaimable: bool = False) -> int:
        """Budget pages segments hold (with `only_reclaimable`: those only free slots map)."""
        nbuf = self.layout.num_buffers
        if not only_reclaimable:
            return sum(len(g.rows) for segs in self._segments.values() for g in segs) * nbuf
        busy = {id(g) for s, g in enumerate(self._seg_of) if g is not None and self._used[s]}
        return sum(
            len(g.rows) for segs in self._segments.values() for g in segs if id(g) not in busy
        ) * nbuf  # fmt: skip

    def cache_pages(self, slot: int, keys: Sequence[Hashable]) -> int:
        """Publish the first `len(keys)` pages of used `slot` (each fully written with final
        tokens: `len(keys) * tokens_per_page <= length(slot)`) under `keys`, for other slots
        to map; keys already cached are left as they are. Returns how many rows were added.

        Shared rows must lead a slot's pages (see `_shares`): publishing stops at the first
        key cached under *another* row (a request that computed the same tokens at the same
        time as the one that published them): its own copy of that page stays private, and so
        must every page after it."""
        with self._lock:
            self._check_slot(slot)
            if len(keys) * self.tokens_per_page > self._lengths[slot]:
                raise ValueError(
                    f"slot {slot}: {len(keys)} pages asked, but only "
                    f"{self._lengths[slot] // self.tokens_per_page} are full of live tokens"
                )
            added = 0
            table = self._table
            for key, row in zip(keys, self._pages[slot], strict=False):
                if table.holds(row[0]):
                    continue  # this slot maps (or published) that row already
                if key in table:
                    break  # cached under another row: this page and all after stay private
                table.add(key, row)
                added += 1
            return added

    def _wait_freed(self, slot: int) -> None:
        """Wait for the device work queued before `slot` was freed (its event; a full sync
        where the backend records none; nothing if it was never used: no kernel has read its
        pages)."""
        event = self._freed_at[slot]
        if not self._freed_seq[slot]:
            return
        if event is None:
            self._backend.synchronize()
        else:
            self._backend.wait_event(event)

    def _shares(self, slot: int) -> bool:
        """Whether `slot` maps prefix rows (always its leading pages)."""
        pages = self._pages[slot]
        return bool(pages) and self._table.holds(pages[0][0])

    def _shared_lead(self, slot: int) -> int:
        """How many leading pages of `slot` are prefix rows (they always lead its pages)."""
        n, holds = 0, self._table.holds
        for row in self._pages[slot]:
            if not holds(row[0]):
                break
            n += 1
        return n

    def _shared_in_used(self, used: list[int]) -> int:
        """Mappings into used slots beyond the first of each page: what sharing saved them."""
        seen: set[int] = set()
        extra = 0
        for s in used:
            for row in self._pages[s][: self._shared_lead(s)]:
                if row[0] in seen:
                    extra += len(row)
                else:
                    seen.add(row[0])
        return extra

    def _acquire(self, handle: int) -> None:
        n = self._refs.get(handle, 0)
        if n == 0 and self._table.holds(handle):
            self._idle_table_handles -= 1
        self._refs[handle] = n + 1

    def _release(self, handle: int) -> bool:
        """One mapping of `handle` fewer; True if it went back to the pool."""
        n = self._refs[handle] - 1
        if n:
            self._refs[handle] = n
            return False
        del self._refs[handle]
        if self._table.holds(handle):
            self._idle_table_handles += 1
            return False
        self._pool.give([handle])
        return True

    def _evict(self, need: int) -> int:
        """Give back segments no slot maps, then drop least recently used prefix rows that no
        slot maps, until `need` pages are back (in the pool, or creatable again); returns how
        many came back."""
        back = self._drop_idle_segments(need)
        for key, row in self._table.lru():
            if back >= need:
                break
            if any(h in self._refs for h in row):
                continue
            self._table.pop(key)
            self._idle_table_handles -= len(row)
            self._pool.give(list(row))
            back += len(row)
        return back
