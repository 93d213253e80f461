"""Zero-copy prefix sharing for `VirtualKVCache` (a mixin: the cache's state, its methods).

`cache_pages(slot, keys)` publishes a slot's full pages in the prefix table (`prefix.py`);
`map_cached(slot, keys)` maps those same physical pages as another slot's leading pages: one
page at several virtual addresses, no copy, no block table. Pages are reference-counted by
mapping (`_acquire` / `_release`); a page goes back to the pool only when no slot maps it and
the table has dropped it (`_evict`, least recently used first, only rows no slot maps).
Invariants are those of `virtual.py` (checked by its `check_integrity`): shared pages hold
whole, final tokens and are always a slot's leading pages; nobody writes into one.

Hot prefixes move into one allocation per buffer, mapped whole in one call: `segments.py`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from vattention.kvcache.segments import PrefixSegments

# Most leading pages `shared_prefix` compares across a group's members where they share rows
# of the table page by page (no segment): bounds its cost per decode step.
SHARED_SCAN_PAGES = 64


class PrefixSharing(PrefixSegments):
    """The sharing half of `VirtualKVCache` (state: `state.CacheState`)."""

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

    def shared_prefix(self, slots: Sequence[int]) -> tuple[int, list[int]] | None:
        """The largest group of `slots` (used) that map the same physical pages first, for
        cascade decoding: (tokens those pages hold, positions in `slots` of the group's
        members), or None where no two share. A group is the slots whose first page is one
        prefix row (the largest group; of equal ones, one that starts a segment). Where that
        row starts a prefix segment (held once, mapped whole: `segments.py`) the shared pages
        are the segment's, O(len(slots)); otherwise they are the leading prefix rows every
        member maps, compared up to `SHARED_SCAN_PAGES` pages (a shorter shared run is still
        correct: the rest is read as each row's own)."""
        groups: dict[int, list[int]] = {}
        with self._lock:
            holds = self._table.holds
            for i, s in enumerate(slots):
                pages = self._pages[s]
                if pages and (pages[0][0] < 0 or holds(pages[0][0])):
                    groups.setdefault(pages[0][0], []).append(i)
            if not groups:
                return None
            first = max(groups, key=lambda k: (len(groups[k]), k < 0))  # ties: a segment
            members = groups[first]
            if len(members) < 2:
                return None
            leader = slots[members[0]]
            lead = self._pages[leader]
            entry = self._seg_entry(lead[0])
            if entry is not None and entry[1] == 0:
                return len(entry[0].rows) * self.tokens_per_page, members
            run = min(SHARED_SCAN_PAGES, self._shared_lead(leader))
            for i in members[1:]:
                pages = self._pages[slots[i]]
                n, stop = 1, min(run, len(pages))
                while n < stop and pages[n][0] == lead[n][0]:
                    n += 1
                run = n
            return run * self.tokens_per_page, members

    def map_cached(self, slot: int, keys: Sequence[Hashable]) -> int:
        """Map the prefix rows of `keys` (all cached) as the first pages of `slot`, a used slot
        with no live token; returns the tokens they hold, now `slot`'s length (fewer than
        `keys` name only where they end inside a segment that cannot be split now: see
        `segments.py`). No page is created or copied: the same physical pages serve every
        slot that maps them."""
        with self._lock:
            self._check_slot(slot)
            if self._lengths[slot]:
                raise ValueError(f"slot {slot} already holds {self._lengths[slot]} tokens")
            self._epoch[slot] += 1  # the caller sets its length (see `step_async`)
            self._publish_stopped.pop(slot, None)
            rows = self._whole_rows(self._cached_rows(keys, "map_cached: not every key"))
            return self._map_rows(slot, rows)

    def _cached_rows(self, keys: Sequence[Hashable], what: str) -> list[tuple[int, ...]]:
        """The rows of `keys`, or a ValueError "{what} has a cached row"."""
        if self._table.match(keys) < len(keys):
            raise ValueError(f"{what} has a cached row")
        return self._table.rows(keys)

    def _map_rows(self, slot: int, rows: list[tuple[int, ...]]) -> int:
        """Map `rows` (whole segments: `_whole_rows`) as the first pages of `slot` (rows it
        already maps there stay, with their access), a segment's in one call per buffer; a hot
        run of page rows becomes a segment first (`_build_hot`). Its length becomes the tokens
        they hold. The slot's pages past the rows it keeps must be private (`alloc_slot`
        unmaps shared ones first)."""
        pages = self._pages[slot]
        nbuf, ps = self.layout.num_buffers, self.page_size
        keep = self._piece_floor(slot, self._matching(slot, rows))
        if self._shared_lead(slot) > keep:
            self._wait_freed(slot)
            self._unmap_tail(slot, len(pages) - keep)
        if keep < min(len(pages), len(rows)):
            self._wait_freed(slot)  # its old pages may still be read by queued work
            for i in range(keep, min(len(pages), len(rows))):  # private pages: replaced
                for buf, h in enumerate(pages[i]):
                    self._backend.unmap(self._base + self.layout.page_offset(buf, slot, i))
                    self._unmap_calls += 1
                    self._release(h)
                pages[i] = []
        rows = list(rows)
        self._build_hot(slot, rows, keep)
        i = keep
        while i < len(rows):
            entry = self._seg_entry(rows[i])
            if entry is not None:  # a whole segment, entered at its first row
                self._map_segment(slot, i, entry[0])
                i += len(entry[0].rows)
                continue
            if i == len(pages):
                pages.append([])
            for buf, h in enumerate(rows[i]):
                self._backend.map(self._base + self.layout.page_offset(buf, slot, i), h)
                self._map_calls += 1
                self._acquire(h)
                pages[i].append(h)
            i += 1
        if keep < len(rows):
            for buf in range(nbuf):
                self._backend.set_access(
                    self._base + self.layout.page_offset(buf, slot, keep), (len(rows) - keep) * ps
                )
                self._access_calls += 1
        self._cap_tokens[slot] = len(pages) * ps // self.layout.buffer_token_bytes
        self._lengths[slot] = len(rows) * self.tokens_per_page
        return self._lengths[slot]

    def _matching(self, slot: int, rows: Sequence[tuple[int, ...]]) -> int:
        """How many leading pages of `slot` are `rows`' leading rows."""
        pages = self._pages[slot]
        n, m = min(len(pages), len(rows)), 0
        while m < n and tuple(pages[m]) == rows[m]:
            m += 1
        return m

    def _piece_floor(self, slot: int, m: int) -> int:
        """The largest count <= `m` of leading pages of `slot` that ends no segment piece
        partway (a piece is unmapped whole: keeping part of it is no keep)."""
        pages = self._pages[slot]
        if m == 0 or m >= len(pages):
            return m
        entry = self._seg_entry(pages[m])
        return m - entry[1] if entry is not None else m

    def cache_pages(self, slot: int, keys: Sequence[Hashable], start: int = 0) -> int:
        """Publish the first `len(keys)` pages of used `slot` (each fully written with final
        tokens: `len(keys) * tokens_per_page <= length(slot)`) under `keys`, for other slots
        to map; keys already cached are left as they are. Returns how many rows were added.
        `start`: the caller knows the first `start` pages are rows already (published by an
        earlier call for this slot, or mapped from the table), so they are not looked at.

        Shared rows must lead a slot's pages (see `_shares`): publishing stops at the first
        key cached under *another* row (a request that computed the same tokens at the same
        time as the one that published them): its own copy of that page stays private, and so
        must every page after it, in this call and every later one until the slot is handed
        out again."""
        with self._lock:
            self._check_slot(slot)
            if len(keys) * self.tokens_per_page > self._lengths[slot]:
                raise ValueError(
                    f"slot {slot}: {len(keys)} pages asked, but only "
                    f"{self._lengths[slot] // self.tokens_per_page} are full of live tokens"
                )
            if not 0 <= start <= len(keys):
                raise ValueError(f"start {start} is not within the {len(keys)} keys")
            if self._publish_stopped.get(slot) == self._tenure[slot]:
                return 0
            added = 0
            table, pages = self._table, self._pages[slot]
            for i in range(start, min(len(keys), len(pages))):
                key, row = keys[i], pages[i]
                if table.holds(row[0]):
                    continue  # this slot maps (or published) that row already
                if key in table:  # cached under another row: this page and all after stay private
                    self._publish_stopped[slot] = self._tenure[slot]
                    break
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
        mapped = 0
        holds = self._table.holds
        for s in used:
            for row in self._pages[s]:
                first = row[0]
                if not holds(first):
                    break  # shared rows lead a slot's pages
                seen.add(first)
                mapped += 1
        return (mapped - len(seen)) * self.layout.num_buffers

    def _acquire(self, handle: int) -> None:
        n = self._refs.get(handle, 0)
        if n == 0 and self._table.owns(handle):
            self._idle_table_handles -= 1
        self._refs[handle] = n + 1

    def _release(self, handle: int) -> bool:
        """One mapping of `handle` (a page, or a segment's row id) fewer; True if it went back
        to the pool (a page no slot maps and the table does not hold, or holds retired)."""
        n = self._refs[handle] - 1
        if n:
            self._refs[handle] = n
            return False
        del self._refs[handle]
        table = self._table
        if table.owns(handle):
            self._idle_table_handles += 1
            return False
        if handle < 0:  # a retired segment's row: the segment goes whole (`_unmap_segment`)
            return False
        if table.holds(handle):  # replaced by a segment's row
            table.drop_retired(handle)
        self._pool.give([handle])
        return True

    def _evict(self, need: int | None) -> int:
        """Destroy retired segments no slot maps, then drop least recently used prefix rows
        that no slot maps (a segment's all at once), until `need` budget pages are back (in
        the pool, or creatable again; None: all of them); returns how many came back."""
        back = self._reap()
        table = self._table
        for key, row in table.lru():
            if need is not None and back >= need:
                break
            if key not in table or any(h in self._refs for h in row):
                continue  # gone with its segment, or mapped
            entry = self._seg_entry(row)
            if entry is not None:
                back += self._destroy_segment(entry[0])
                continue
            table.pop(key)
            self._idle_table_handles -= len(row)
            self._pool.give(list(row))
            back += len(row)
        return back
