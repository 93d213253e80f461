"""A snapshot of a KV cache's memory use (all sizes in bytes).

Every mapped byte is accounted for: `mapped = used_mapped + reclaimable`, where
`used_mapped = live + slack + lookahead` (used slots) and `prepared <= reclaimable` are the
free slots' pages mapped ahead for upcoming requests (the rest is deferred reclamation).
These count mappings: a prefix page mapped into several slots counts once per slot, and
`shared_saved_bytes` is what used slots' extra mappings of shared pages did not cost, so
`used_mapped - shared_saved` is the physical memory used slots hold (each page once; a
prefix segment's pages are rows like any other).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KVCacheStats:
    page_size: int
    budget_bytes: int
    created_bytes: int  # physical pages that exist (mapped or pooled)
    mapped_bytes: int  # pages mapped into any slot, used or free
    live_bytes: int  # bytes holding the live tokens of used slots
    used_mapped_bytes: int  # pages mapped into used slots = live + slack + look-ahead
    reclaimable_bytes: int  # pages still mapped in free slots (deferred reclamation)
    pool_free_bytes: int  # created pages mapped nowhere
    slots_used: int
    slots_free: int
    map_calls: int
    blocking_map_calls: int  # made inside step/ensure (the caller waited), not in the background
    unmap_calls: int
    set_access_calls: int
    create_calls: int
    destroy_calls: int
    # The split of used slots' mapped bytes (`live + slack + lookahead == used_mapped`):
    slack_bytes: int = 0  # page granularity: the unused tail of the pages live tokens need
    lookahead_bytes: int = 0  # pages mapped ahead, beyond those the live tokens need
    # Part of `reclaimable_bytes`: free slots' pages mapped for the requests expected next.
    prepared_bytes: int = 0
    # Prefix sharing (`VirtualKVCache.cache_pages` / `map_cached`): physical pages in the
    # prefix table, those of them no slot maps (evictable), the bytes extra mappings of shared
    # pages would have cost as copies, and the pages served to `map_cached` so far.
    prefix_bytes: int = 0
    prefix_idle_bytes: int = 0
    shared_saved_bytes: int = 0
    prefix_hit_pages: int = 0
    # Prefix segments (`segments.py`): hot prefixes moved into one allocation per buffer,
    # physical memory beyond `created_bytes` (within the budget; part of `prefix_bytes`
    # while in the table)
    segment_bytes: int = 0
    segments_built: int = 0  # since the cache was made
    segments_split: int = 0  # split where a lookup ended inside them

    @property
    def internal_fragmentation(self) -> float:
        """Share of the used slots' mapped bytes that hold no live token."""
        if self.used_mapped_bytes == 0:
            return 0.0
        return 1.0 - self.live_bytes / self.used_mapped_bytes

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = dict(asdict(self))
        d["internal_fragmentation"] = self.internal_fragmentation
        return d
