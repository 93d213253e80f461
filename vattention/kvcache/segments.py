"""Prefix segments for `VirtualKVCache` (a mixin under `sharing.PrefixSharing`).

Why: the driver charges per mapping, not per byte (H200: ~25 us to grant access to one 2 MiB
page or to one 256 MiB allocation), so mapping a 4K-token prefix of Llama-3-8B page by page
(256 pages) costs milliseconds an admission, while paged engines only copy block ids.

What: once a run of prefix rows is *hot* (mapped by two slots or more), its pages are copied
(on the device, stream-ordered) into one allocation per buffer, a segment, and the segment
*replaces* them: the table's keys of those rows name the segment's rows from then on
(`PrefixTable.retire`), later admissions map it in one call per buffer, and the old pages go
back to the pool as the slots that still map them let go. A hot prefix is held once.

Invariants (`accounting.check_integrity` verifies them):
- A segment's rows are ids of its own (negative, never a page handle, never reused; row i of
  buffer b is page i of that buffer's allocation). `_pages`, `_refs` and the prefix table
  hold them like page handles, but a slot maps a segment only whole, as consecutive pages (a
  *piece*, entered at its first row), and unmaps it whole: the driver maps no part of an
  allocation (CUDA_ERROR_NOT_SUPPORTED on the H200).
- Every segment is also mapped at a *home* range of its own (virtual addresses only): the
  source and target of the copies that make segments, whether or not a slot maps it.
  `copied_at` is an event after the last copy that touched it; its home is unmapped only
  after that event.
- A lookup that leaves a segment before its end (it ends there, or its chain branches off
  there) splits it there (`_whole_rows`): two new segments, copied from its home, take its
  keys, and it is *retired*: destroyed as soon as no slot maps it (by `_evict` if none did
  when it was split). Without memory to spare for the split, the hit stops before the
  segment, so shared rows are never written.
- A live segment's rows are all in the table, a retired one's none; segments count against
  the budget (`PagePool.hold`); one no slot maps is evicted whole, in LRU order with the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vattention.kvcache.state import CacheState
from vattention.memory.errors import MemoryBackendError, OutOfKVMemory


@dataclass(eq=False)
class Segment:
    """One allocation per buffer holding `len(rows)` consecutive prefix pages."""

    rows: tuple[tuple[int, ...], ...]  # its row ids: rows[i][b] is page i of buffer b
    handles: tuple[int, ...]  # one allocation per buffer
    home: int  # where it is mapped for copies (buffer b at home + b * len(rows) pages)
    view: torch.Tensor  # bytes of the home range
    users: int = 0  # slots mapping it (a piece each)
    retired: bool = False  # its keys name other rows now: it goes once no slot maps it
    copied_at: Any = None  # device event after the last copy that touched its home


class PrefixSegments(CacheState):
    """The segment half of prefix sharing (state: `state.CacheState`)."""

    def _seg_entry(self, row: tuple[int, ...] | list[int]) -> tuple[Segment, int] | None:
        """(segment, index) of a segment row; None for a row of page handles."""
        return self._seg_ids.get(row[0]) if row[0] < 0 else None

    # -- making segments --------------------------------------------------------------------
    def _new_segment(self, n: int) -> Segment | None:
        """An empty segment of `n` pages per buffer, mapped at its home, its rows idle (not
        yet in the table); None, nothing changed, if memory is not plentiful (it would leave
        less than a tenth of the budget obtainable) or the device refuses."""
        nbuf, ps = self.layout.num_buffers, self.page_size
        if not self._pool.hold(n * nbuf, keep=self._pool.budget // 10):
            return None
        handles: list[int] = []
        home, mapped = None, 0
        try:
            for _ in range(nbuf):
                handles.append(self._backend.create_page(n))
            home = self._backend.reserve(n * nbuf * ps)
            for b, h in enumerate(handles):
                self._backend.map(home + b * n * ps, h)
                mapped += 1
            self._backend.set_access(home, n * nbuf * ps)
            view = self._backend.tensor(home, n * nbuf * ps)
        except (OutOfKVMemory, MemoryBackendError):
            for b in range(mapped):
                self._backend.unmap(home + b * n * ps)  # type: ignore[operator]
            if home is not None:
                self._backend.release_range(home, n * nbuf * ps)
            for h in handles:
                self._backend.destroy_page(h)
            self._pool.unhold(n * nbuf)
            return None
        first = self._next_row_id
        self._next_row_id -= n * nbuf
        rows = tuple(tuple(first - i * nbuf - b for b in range(nbuf)) for i in range(n))
        seg = Segment(rows, tuple(handles), home, view)
        self._segments[first] = seg
        for i, row in enumerate(rows):
            for rid in row:
                self._seg_ids[rid] = (seg, i)
        return seg

    def _adopt(self, seg: Segment, old_rows: list[tuple[int, ...]]) -> None:
        """The table's keys of `old_rows` (in the table) now name `seg`'s rows, in order. Old
        page handles go back to the pool once no slot maps them (now, if none does); an old
        segment's rows leave with it."""
        table = self._table
        for old, new in zip(old_rows, seg.rows, strict=True):
            table.retire(table.key_of(old[0]), new)
            for h in old:
                if h not in self._refs:  # mapped nowhere: it was idle
                    self._idle_table_handles -= 1
                    if h >= 0:
                        table.drop_retired(h)
                        self._pool.give([h])
        self._idle_table_handles += len(seg.rows) * self.layout.num_buffers

    def _build_hot(self, slot: int, rows: list[tuple[int, ...]], start: int) -> None:
        """Before `slot` maps `rows[start:]`: if at least `segment_min_pages` page rows from
        the first page row on are hot (two slots or more map them), copy them from a slot that
        maps them into a new segment that replaces them (`rows` is updated in place)."""
        low = self.segment_min_pages
        if not low:
            return
        p = start
        while p < len(rows) and (entry := self._seg_entry(rows[p])) is not None:
            p += len(entry[0].rows)  # pieces are whole: skip the segment
        q = p
        while q < len(rows) and rows[q][0] >= 0 and self._refs.get(rows[q][0], 0) >= 2:
            q += 1
        if q - p < low:
            return
        source = next(
            (
                s for s, pages in enumerate(self._pages)
                if s != slot and len(pages) >= q and tuple(pages[p]) == rows[p]
                and tuple(pages[q - 1]) == rows[q - 1]
            ),
            None,
        )  # fmt: skip
        if source is None:
            return
        seg = self._new_segment(q - p)
        if seg is None:
            return
        n, ps = q - p, self.page_size
        for buf in range(self.layout.num_buffers):
            src = self.layout.page_offset(buf, source, p)
            seg.view[buf * n * ps : (buf + 1) * n * ps].copy_(self._raw[src : src + n * ps])
        seg.copied_at = self._backend.record_event()
        if not self._used[source]:  # unmapping it must now wait for the copy too
            self._freed_at[source] = seg.copied_at
        self._adopt(seg, rows[p:q])
        rows[p:q] = seg.rows
        self._segments_built += 1

    def _whole_rows(self, rows: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """`rows` (a lookup from the first page on) with no segment partly covered: where they
        leave one before its end (they end there, or branch off: another chain shared its
        first rows), it is split there (`_split`), its first part's rows in its place;
        without memory for that, the rows stop before it."""
        out = list(rows)
        i = 0
        while i < len(out):
            entry = self._seg_entry(out[i])
            if entry is None:
                i += 1
                continue
            seg, j = entry
            if j:  # entered past its first row: cannot happen along a chain of keys
                return out[:i]
            n, m = len(seg.rows), 0
            while m < n and i + m < len(out) and tuple(out[i + m]) == seg.rows[m]:
                m += 1
            if m < n:
                head = self._split(seg, m)
                if head is None:
                    return out[:i]
                out[i : i + m] = head.rows
            i += m
        return out

    def _split(self, seg: Segment, at: int) -> Segment | None:
        """Replace live `seg` by two new segments (its first `at` rows and the rest), copied
        from its home; returns the first, or None (nothing changed) without memory for both.
        `seg` is retired: it goes once no slot maps it."""
        n, nbuf, ps = len(seg.rows), self.layout.num_buffers, self.page_size
        head = self._new_segment(at)
        if head is None:
            return None
        tail = self._new_segment(n - at)
        if tail is None:
            head.retired = True  # never in the table
            self._destroy_segment(head)
            return None
        for buf in range(nbuf):
            src = seg.view[buf * n * ps : (buf + 1) * n * ps]
            head.view[buf * at * ps : (buf + 1) * at * ps].copy_(src[: at * ps])
            tail.view[buf * (n - at) * ps : (buf + 1) * (n - at) * ps].copy_(src[at * ps :])
        seg.copied_at = head.copied_at = tail.copied_at = self._backend.record_event()
        self._adopt(head, list(seg.rows[:at]))
        self._adopt(tail, list(seg.rows[at:]))
        seg.retired = True
        self._segments_split += 1
        return head

    # -- mapping, unmapping, destroying -------------------------------------------------------
    def _map_segment(self, slot: int, page: int, seg: Segment) -> None:
        """Map `seg` whole as pages `page...` of `slot` (pages already extended with empty
        rows up to `page` where needed)."""
        pages = self._pages[slot]
        for buf, h in enumerate(seg.handles):
            self._backend.map(self._base + self.layout.page_offset(buf, slot, page), h)
            self._map_calls += 1
        seg.users += 1
        for i, row in enumerate(seg.rows):
            if page + i == len(pages):
                pages.append([])
            for rid in row:
                self._acquire(rid)
                pages[page + i].append(rid)

    def _unmap_segment(self, slot: int, seg: Segment) -> int:
        """Unmap `seg`, the last pages of `slot`, whole; returns the budget pages that came
        back (a retired segment no slot maps any more is destroyed)."""
        pages = self._pages[slot]
        n = len(seg.rows)
        first = len(pages) - n
        for buf in range(len(seg.handles)):
            self._backend.unmap(self._base + self.layout.page_offset(buf, slot, first))
            self._unmap_calls += 1
        for row in pages[first:]:
            for rid in row:
                self._release(rid)
        del pages[first:]
        seg.users -= 1
        if seg.retired and not seg.users:
            return self._destroy_segment(seg)
        return 0

    def _destroy_segment(self, seg: Segment) -> int:
        """Unmap `seg`'s home (after its last copy) and destroy it; its rows must be mapped by
        no slot and be out of the table, or idle in it (they leave it). Returns the budget
        pages given back."""
        n, nbuf, ps = len(seg.rows), self.layout.num_buffers, self.page_size
        assert not seg.users
        if not seg.retired:
            for row in seg.rows:
                self._table.pop(self._table.key_of(row[0]))
            self._idle_table_handles -= n * nbuf
        else:
            for row in seg.rows:
                for rid in row:
                    if self._table.holds(rid):
                        self._table.drop_retired(rid)
        if seg.copied_at is not None:
            self._backend.wait_event(seg.copied_at)
        for b in range(nbuf):
            self._backend.unmap(seg.home + b * n * ps)
        seg.view = torch.empty(0, dtype=torch.uint8)
        self._backend.release_range(seg.home, n * nbuf * ps)
        for h in seg.handles:
            self._backend.destroy_page(h)
        self._pool.unhold(n * nbuf)
        del self._segments[seg.rows[0][0]]
        for row in seg.rows:
            for rid in row:
                del self._seg_ids[rid]
        return n * nbuf

    def _reap(self) -> int:
        """Destroy retired segments no slot maps; returns the budget pages given back."""
        dead = [g for g in self._segments.values() if g.retired and not g.users]
        return sum(self._destroy_segment(g) for g in dead)

    def _reapable(self) -> int:
        """Budget pages `_reap` would give back."""
        nbuf = self.layout.num_buffers
        return sum(len(g.rows) * nbuf for g in self._segments.values() if g.retired and not g.users)
