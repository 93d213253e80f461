"""Accounting for `VirtualKVCache` (a mixin): `stats()`, the byte-by-byte view of what is
mapped, and `check_integrity()`, which checks every invariant stated in `virtual.py` (and in
`sharing.py` / `segments.py`) against the cache's own records and the backend's.
"""

from __future__ import annotations

from vattention.kvcache.state import CacheState
from vattention.kvcache.stats import KVCacheStats


class CacheAccounting(CacheState):
    """Stats and integrity checks (state: `state.CacheState`)."""

    def stats(self) -> KVCacheStats:
        with self._lock:
            ps, nbuf = self.page_size, self.layout.num_buffers
            used = [s for s in range(self.spec.max_slots) if self._used[s]]
            used_pages = sum(len(self._pages[s]) for s in used) * nbuf
            live = sum(self._lengths[s] for s in used) * self.layout.buffer_token_bytes * nbuf
            needed = sum(self.layout.pages_for(self._lengths[s]) for s in used) * nbuf
            prepared = sum(
                len(self._pages[s]) for s in range(self.spec.max_slots)
                if self._prepared[s] and not self._used[s]
            ) * nbuf  # fmt: skip
            free_mapped = self._free_mapped()
            return KVCacheStats(
                page_size=ps,
                budget_bytes=self._pool.budget * ps,
                created_bytes=self._pool.created * ps,
                mapped_bytes=(used_pages + free_mapped) * ps,
                live_bytes=live,
                used_mapped_bytes=used_pages * ps,
                reclaimable_bytes=free_mapped * ps,
                pool_free_bytes=len(self._pool.free) * ps,
                slots_used=len(used),
                slots_free=self.spec.max_slots - len(used),
                map_calls=self._map_calls,
                blocking_map_calls=self._blocking_map_calls,
                unmap_calls=self._unmap_calls,
                set_access_calls=self._access_calls,
                create_calls=self._pool.create_calls,
                destroy_calls=self._pool.destroy_calls,
                slack_bytes=needed * ps - live,
                lookahead_bytes=(used_pages - needed) * ps,
                prepared_bytes=prepared * ps,
                prefix_bytes=self._table.num_handles * ps,
                prefix_idle_bytes=self._idle_table_handles * ps,
                shared_saved_bytes=self._shared_in_used(used) * ps,
                prefix_hit_pages=self._table.hits,
                segment_bytes=self._pool.held * ps,
                segments_built=self._segments_built,
                segments_split=self._segments_split,
            )

    def check_integrity(self) -> None:
        """Raise `RuntimeError` listing every broken invariant (for tests and debugging)."""
        with self._lock:
            problems: list[str] = []
            nbuf = self.layout.num_buffers
            mapped = [h for rows in self._pages for row in rows for h in row]
            if any(len(row) != nbuf for rows in self._pages for row in rows):
                problems.append("a page index is mapped in some buffers only")
            owned = set(self._table.handles())  # current rows (segment row ids included)
            retired = set(self._table.retired())
            table = owned | retired
            counts: dict[int, int] = {}
            for h in mapped:
                counts[h] = counts.get(h, 0) + 1
            if counts != self._refs:
                problems.append("mapping counts differ from the reference counts")
            if any(n > 1 and h not in table for h, n in counts.items()):
                problems.append("a page outside the prefix table is mapped twice")
            if {h for h in retired if h >= 0} - set(counts):
                problems.append("a retired prefix page is mapped nowhere (it should be pooled)")
            pages = {h for h in set(counts) | table if h >= 0}
            handles = list(pages) + self._pool.free
            if len(set(handles)) != len(handles):
                problems.append("a pooled page is also mapped or in the prefix table")
            if len(handles) != self._pool.created:
                problems.append(f"{len(handles)} pages accounted, {self._pool.created} created")
            if self._idle_table_handles != len(owned - set(counts)):
                problems.append("the count of prefix pages mapped nowhere is off")
            if {h for h in table | set(counts) if h < 0} - set(self._seg_ids):
                problems.append("a segment row outlives its segment")
            for s in range(self.spec.max_slots):
                shared = [self._table.holds(row[0]) for row in self._pages[s] if row]
                if shared != sorted(shared, reverse=True):
                    problems.append(f"slot {s}: prefix rows do not lead its pages")
            self._check_segments(counts, owned, problems)
            if self._pool.created + self._pool.held > self._pool.budget:
                problems.append("more pages created or held than the budget")
            for s in range(self.spec.max_slots):
                cap = len(self._pages[s]) * self.page_size // self.layout.buffer_token_bytes
                if self._cap_tokens[s] != cap:
                    problems.append(f"slot {s}: capacity {self._cap_tokens[s]} != {cap} tokens")
                if self._lengths[s] > cap:
                    problems.append(f"slot {s}: {self._lengths[s]} live tokens beyond its pages")
                if not self._used[s] and self._lengths[s]:
                    problems.append(f"free slot {s} has live tokens")
            # physical mappings: a segment piece is one mapping per buffer, plus its home's
            segs = list(self._segments.values())
            pieces = sum(g.users for g in segs)
            physical = sum(h >= 0 for h in mapped) + (pieces + len(segs)) * nbuf
            handles_made = self._pool.created + len(segs) * nbuf
            backend = self._backend
            if self._owns_backend and getattr(backend, "num_mappings", physical) != physical:
                problems.append("backend mappings differ from the cache's")
            if self._owns_backend and getattr(backend, "num_pages", handles_made) != handles_made:
                problems.append("backend pages differ from the cache's")
            if problems:
                raise RuntimeError("KV cache integrity: " + "; ".join(problems))

    def _check_segments(self, counts: dict[int, int], owned: set[int], problems: list[str]) -> None:
        """The invariants of `segments.py`: pieces whole, users and references agree, a live
        segment's rows all in the table and a retired one's none, the budget held."""
        nbuf = self.layout.num_buffers
        segs = list(self._segments.values())
        users = {id(g): 0 for g in segs}
        for s in range(self.spec.max_slots):
            pages, i = self._pages[s], 0
            while i < len(pages):
                entry = self._seg_ids.get(pages[i][0]) if pages[i] else None
                if entry is None:
                    i += 1
                    continue
                g, j = entry
                got = [tuple(r) for r in pages[i : i + len(g.rows)]]
                if j or got != list(g.rows):
                    problems.append(f"slot {s}: a prefix segment is mapped in part")
                    break
                users[id(g)] += 1
                i += len(g.rows)
        for g in segs:
            if users[id(g)] != g.users:
                problems.append("a prefix segment's user count is off")
            if any(counts.get(rid, 0) != g.users for row in g.rows for rid in row):
                problems.append("a prefix segment's rows are mapped unevenly")
            in_table = [row[0] in owned for row in g.rows]
            if in_table != [not g.retired] * len(g.rows):
                problems.append("a prefix segment's rows and the table disagree")
        if self._pool.held != sum(len(g.rows) for g in segs) * nbuf:
            problems.append("the budget held by prefix segments is off")
