"""Prefix segments for `VirtualKVCache` (a mixin under `sharing.PrefixSharing`).

The driver's cost is per mapping, not per byte (H200: granting access to one
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

from dataclasses import dataclass

from vattention.kvcache.state import CacheState
from vattention.memory.errors import MemoryBackendError, OutOfKVMemory


@dataclass(eq=False)
class Segment:
    """One allocation per buffer holding copies of the pages of `rows` (table rows), in order."""

    rows: tuple[tuple[int, ...], ...]
    handles: tuple[int, ...]  # one per buffer, len(rows) pages each
    users: int = 0  # slots mapping it


class PrefixSegments(CacheState):
    """The segment half of prefix sharing (state: `state.CacheState`)."""

    def _segment_for(
        self, slot: int, rows: list[tuple[int, ...]]
    ) -> tuple[Segment | None, int, int | None]:
        """(segment, how many leading `rows` it backs, the slot to fill it from if it is new)
        for `slot`'s new prefix: an existing segment holding exactly them; else a new one for
        their hot leading part (the rows two slots or more map: a shared system prompt before a
        conversation of its own), if longer than any existing one and memory is plentiful;
        else the longest existing one whose rows all lead `rows` (a segment is mapped whole:
        the driver maps no part of an allocation); else (None, 0, None). Each part needs at
        least `segment_min_pages` rows."""
        low = self.segment_min_pages
        if not low or len(rows) < low:
            return None, 0, None
        best, most = None, 0
        for seg in self._segments.get(rows[0], ()):
            m = len(seg.rows)
            if m > most and seg.rows == tuple(rows[:m]):
                best, most = seg, m
        if most == len(rows):
            return best, most, None
        hot = 0  # mappings of a chain's rows never grow along it: shared rows lead
        while hot < len(rows) and self._refs.get(rows[hot][0], 0) >= 2:
            hot += 1
        if hot > most and hot >= low:
            built = self._build_segment(slot, rows[:hot])
            if built is not None:
                return built[0], hot, built[1]
        if most >= low:
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
        self._segments_built += 1
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

    def _reclaimable_segment_pages(self) -> int:
        """Budget pages of the segments no used slot maps (free slots' go whole, and the
        segment with them)."""
        busy = {id(g) for s, g in enumerate(self._seg_of) if g is not None and self._used[s]}
        pages = sum(
            len(g.rows) for segs in self._segments.values() for g in segs if id(g) not in busy
        )  # fmt: skip
        return pages * self.layout.num_buffers
