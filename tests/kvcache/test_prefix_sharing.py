"""Zero-copy prefix sharing in `VirtualKVCache`: one physical page mapped into several slots.

CPU backend (memfd pages mapped at several addresses alias, as CUDA handles do): published pages
read the same through every slot that maps them, writes through one view show in the others
(no copy), nothing is created to share, a free slot mapping shared pages is scrubbed before it
is handed out again, idle rows are evicted last when memory is short, and a random sequence of
operations (hypothesis) never frees a mapped page, leaks one, or changes a published row.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vattention import OutOfKVMemory, VirtualKVCache
from vattention.kvcache.spec import KVCacheSpec

PAGE = 4096


def _spec(layout: str = "cross_layer", slots: int = 4) -> KVCacheSpec:
    # 2 layers x 2 heads x 16 dims x fp32: 256 bytes a token (cross-layer) -> 16 tokens a page
    return KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, max_slots=slots,
                       max_seq_len=160, dtype=torch.float32, layout=layout,
                       page_size=PAGE)  # fmt: skip


def _cache(
    layout: str = "cross_layer", pages: int = 64, slots: int = 4, segment_min_pages: int = 0
) -> VirtualKVCache:
    spec = _spec(layout, slots)
    nbuf = 2 if layout == "cross_layer" else 2 * spec.num_layers
    return VirtualKVCache(spec, "cpu", budget_bytes=pages * nbuf * PAGE, lookahead_tokens=0,
                          segment_min_pages=segment_min_pages)  # fmt: skip


def _fill(cache: VirtualKVCache, slot: int, n: int, base: float) -> None:
    for layer in range(cache.spec.num_layers):
        vals = base + torch.arange(n, dtype=torch.float32) + 1000 * layer
        cache.k_cache(layer)[slot, :n] = vals.view(n, 1, 1)
        cache.v_cache(layer)[slot, :n] = -vals.view(n, 1, 1)


def _read(cache: VirtualKVCache, slot: int, n: int) -> torch.Tensor:
    layers = range(cache.spec.num_layers)
    return torch.stack([cache.k_cache(i)[slot, :n].clone() for i in layers] +
                       [cache.v_cache(i)[slot, :n].clone() for i in layers])  # fmt: skip


@pytest.mark.parametrize("layout", ["cross_layer", "cross_layer_kv", "per_layer"])
def test_shared_pages_alias_without_copies(layout: str) -> None:
    with _cache(layout) as cache:
        t = cache.tokens_per_page
        a = cache.alloc_slot()
        cache.ensure(a, 3 * t + 5)
        _fill(cache, a, 3 * t + 5, 1.0)
        assert cache.cache_pages(a, ["p0", "p1", "p2"]) == 3
        assert cache.cache_pages(a, ["p0"]) == 0  # already cached
        with pytest.raises(ValueError, match="full of live tokens"):
            cache.cache_pages(a, ["p0", "p1", "p2", "p3"])
        created = cache.stats().created_bytes
        b = cache.alloc_slot()
        assert cache.cached_prefix(["p0", "p1", "x"]) == 2
        assert cache.map_cached(b, ["p0", "p1"]) == 2 * t
        assert cache.length(b) == 2 * t
        assert torch.equal(_read(cache, b, 2 * t), _read(cache, a, 2 * t))
        stats = cache.stats()
        assert stats.created_bytes == created  # sharing created nothing
        nbuf = cache.layout.num_buffers
        assert stats.shared_saved_bytes == 2 * nbuf * PAGE
        assert stats.prefix_bytes == 3 * nbuf * PAGE and stats.prefix_hit_pages == 2
        cache.k_cache(0)[a, 3] = 77.0  # one physical page: the write shows through b
        assert float(cache.k_cache(0)[b, 3].flatten()[0]) == 77.0
        cache.ensure(b, 2 * t + 9)  # b grows on pages of its own
        _fill_tail = torch.full((9, 2, 16), 5.0)
        cache.k_cache(1)[b, 2 * t : 2 * t + 9] = _fill_tail
        assert float(cache.k_cache(1)[a, 2 * t].flatten()[0]) != 5.0
        cache.check_integrity()


def test_map_cached_rejects_bad_use() -> None:
    with _cache() as cache:
        t = cache.tokens_per_page
        a = cache.alloc_slot()
        cache.ensure(a, t)
        cache.cache_pages(a, ["k"])
        with pytest.raises(ValueError, match="already holds"):
            cache.map_cached(a, ["k"])
        b = cache.alloc_slot()
        with pytest.raises(ValueError, match="not every key"):
            cache.map_cached(b, ["k", "missing"])
        assert cache.length(b) == 0
        cache.check_integrity()


def test_tokens_per_page_must_be_whole() -> None:
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=16, max_slots=2, max_seq_len=64,
                       dtype=torch.float32, page_size=PAGE)  # 384 bytes a token  # fmt: skip
    with (
        VirtualKVCache(spec, "cpu", budget_bytes=8 * PAGE) as cache,
        pytest.raises(ValueError, match="whole tokens per page"),
    ):
        _ = cache.tokens_per_page


def test_rows_outlive_their_slots_and_slots_are_scrubbed() -> None:
    with _cache(slots=2) as cache:
        t = cache.tokens_per_page
        a = cache.alloc_slot()
        cache.ensure(a, 2 * t)
        _fill(cache, a, 2 * t, 3.0)
        want = _read(cache, a, 2 * t)
        cache.cache_pages(a, ["r0", "r1"])
        cache.free_slot(a)
        b = cache.alloc_slot()  # the only other slot: it has no pages
        cache.free_slot(b)
        c = cache.alloc_slot()  # prefers the empty slot b over a (which shares)
        assert c == b
        d = cache.alloc_slot()  # now a: scrubbed before it is handed out
        assert d == a and cache.mapped_pages(d) == 0
        assert cache.stats().prefix_idle_bytes == 2 * 2 * PAGE
        cache.ensure(d, 2 * t)
        _fill(cache, d, 2 * t, 99.0)  # writes into new pages, not into the rows
        cache.free_slot(c)
        e = cache.alloc_slot()
        cache.map_cached(e, ["r0", "r1"])
        assert torch.equal(_read(cache, e, 2 * t), want)
        cache.check_integrity()


def test_idle_rows_are_evicted_last_and_lru_first() -> None:
    with _cache(pages=6, slots=3) as cache:  # 6 pages a buffer in all
        t = cache.tokens_per_page
        a = cache.alloc_slot()
        cache.ensure(a, 4 * t)
        cache.cache_pages(a, ["old", "mid"])  # two rows in the table
        cache.free_slot(a)
        b = cache.alloc_slot()
        cache.ensure(b, t)
        cache.cache_pages(b, ["new"])
        cache.map_cached(cache.alloc_slot(), ["mid"])  # touch "mid": now newer than "old"
        # b needs 4 more pages a buffer: the pool's last one, a's two own pages (unmapping a
        # leaves "old" idle and "mid" still mapped), then the idle "old" row
        cache.ensure(b, 5 * t)
        assert cache.cached_prefix(["old"]) == 0
        assert cache.cached_prefix(["mid"]) == 1 and cache.cached_prefix(["new"]) == 1
        with pytest.raises(OutOfKVMemory):  # "mid" and "new" are mapped: never evicted
            cache.ensure(b, 6 * t)
        cache.check_integrity()


def test_alloc_with_a_prefix_reuses_the_slot_that_maps_it() -> None:
    """`alloc_slot(keys)`: the free slot already mapping the rows is handed out with them (no
    map call, its length over them); reads equal the published data; an uncached key is
    refused with no slot taken; a slot whose shared rows differ is scrubbed first."""
    with _cache(slots=4) as cache:
        t = cache.tokens_per_page
        a = cache.alloc_slot()
        cache.ensure(a, 2 * t + 3)
        _fill(cache, a, 2 * t + 3, 5.0)
        cache.cache_pages(a, ["s0", "s1"])
        want = _read(cache, a, 2 * t)
        b = cache.alloc_slot(["s0", "s1"])
        assert cache.length(b) == 2 * t and torch.equal(_read(cache, b, 2 * t), want)
        cache.free_slot(b)
        before = cache.stats()
        c = cache.alloc_slot(["s0", "s1"])
        after = cache.stats()
        assert c == b and after.map_calls == before.map_calls  # nothing mapped again,
        assert after.set_access_calls == before.set_access_calls  # nor access granted again
        assert torch.equal(_read(cache, c, 2 * t), want)
        used = cache.num_free_slots
        with pytest.raises(ValueError, match="not every prefix key"):
            cache.alloc_slot(["s0", "nope"])
        assert cache.num_free_slots == used
        cache.free_slot(c)
        d = cache.alloc_slot(["s0"])  # keeps one of the two rows, unmaps the other
        assert d == c and cache.length(d) == t
        cache.ensure(d, 2 * t)
        for layer in range(cache.spec.num_layers):  # its own tokens: past the kept row
            cache.k_cache(layer)[d, t : 2 * t] = 9.0
            cache.v_cache(layer)[d, t : 2 * t] = -9.0
        assert torch.equal(_read(cache, a, 2 * t), want)  # the shared row s1 is untouched
        assert torch.equal(_read(cache, d, t), want[:, :t])
        cache.check_integrity()
        assert cache.stats().shared_saved_bytes == cache.layout.num_buffers * PAGE  # s0 twice


def test_rows_mapped_only_by_free_slots_are_reclaimable_however_many_map_them() -> None:
    """Three free slots map the same two rows; a request needing the whole budget gets it
    (the free slots are unmapped, the rows evicted): a page counts as reclaimable once every
    slot mapping it is free, not only when one slot maps it."""
    with _cache(pages=4, slots=4) as cache:
        t = cache.tokens_per_page
        a = cache.alloc_slot()
        cache.ensure(a, 2 * t)
        cache.cache_pages(a, ["r0", "r1"])
        b, c = cache.alloc_slot(), cache.alloc_slot()  # fresh slots: preferred over a
        cache.map_cached(b, ["r0", "r1"])
        cache.map_cached(c, ["r0", "r1"])
        for s in (a, b, c):
            cache.free_slot(s)
        d = cache.alloc_slot()
        cache.ensure(d, 4 * t)  # 2 pages from the pool, 2 from the evicted rows
        assert cache.length(d) == 4 * t and cache.cached_prefix(["r0", "r1"]) == 0
        cache.check_integrity()


@pytest.mark.parametrize("layout", ["cross_layer", "cross_layer_kv", "per_layer"])
def test_a_second_copy_of_cached_tokens_is_not_published_past_them(layout: str) -> None:
    """Two slots computed the same tokens at once; the first publishes them. The second's
    copies stay private, and so do its later pages (shared rows must lead a slot's pages, or a
    later request could be handed the slot and write into a shared page)."""
    with _cache(layout) as cache:
        t = cache.tokens_per_page
        a, b = cache.alloc_slot(), cache.alloc_slot()
        for s in (a, b):
            cache.ensure(s, 3 * t)
            _fill(cache, s, 3 * t, 1.0)
        assert cache.cache_pages(a, ["k0", "k1"]) == 2
        assert cache.cache_pages(b, ["k0", "k1", "k2"]) == 0
        assert cache.cached_prefix(["k0", "k1", "k2"]) == 2
        cache.check_integrity()
        cache.free_slot(b)
        c = cache.alloc_slot()  # may be b: none of its pages is shared, so it can be written
        cache.ensure(c, 3 * t)
        _fill(cache, c, 3 * t, 50.0)
        d = cache.alloc_slot(["k0", "k1"])
        assert torch.equal(_read(cache, d, 2 * t), _read(cache, a, 2 * t))
        cache.check_integrity()


def test_publishing_from_start_and_stopping_for_good() -> None:
    """`cache_pages(start=n)` looks only at pages from n on (the scheduler passes what it
    published before), and a slot that met a key cached under another row publishes nothing
    more until it is handed out again, even when later calls start past that page."""
    with _cache("cross_layer_kv") as cache:
        t = cache.tokens_per_page
        a, b = cache.alloc_slot(), cache.alloc_slot()
        for s in (a, b):
            cache.ensure(s, 4 * t)
            _fill(cache, s, 4 * t, 1.0)
        assert cache.cache_pages(a, ["k0"]) == 1
        assert cache.cache_pages(a, ["k0", "k1", "k2"], start=1) == 2
        with pytest.raises(ValueError, match="start 4 is not within"):
            cache.cache_pages(a, ["k0"], start=4)
        assert cache.cache_pages(b, ["x0", "k1"]) == 1  # x0 published; k1 is a's: stop
        assert cache.cache_pages(b, ["x0", "k1", "x2", "x3"], start=2) == 0  # still stopped
        assert cache.cached_prefix(["x0"]) == 1 and cache.cached_prefix(["x2"]) == 0
        cache.check_integrity()
        cache.free_slot(b)
        c = cache.alloc_slot()
        cache.ensure(c, 2 * t)
        _fill(cache, c, 2 * t, 3.0)
        assert cache.cache_pages(c, ["y0", "y1"]) == 2  # a new tenure publishes again
        cache.check_integrity()


def test_paged_alloc_with_a_prefix_lists_its_blocks() -> None:
    from vattention.kvcache.paged import PagedKVCache

    spec = _spec(slots=3)
    with PagedKVCache(spec, 16, num_blocks=32, device="cpu") as cache:
        a = cache.alloc_slot()
        cache.ensure(a, 40)
        cache.cache_pages(a, ["b0", "b1"])
        with pytest.raises(ValueError, match="not every prefix key"):
            cache.alloc_slot(["b0", "x"])
        b = cache.alloc_slot(["b0", "b1"])
        assert cache.length(b) == 32 and cache.stats().shared_saved_bytes > 0


class SharingMachine(RuleBasedStateMachine):
    """Random alloc / grow / publish / map_cached / free / trim, with the data of every row."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = _cache(layout="cross_layer", pages=10, slots=4)
        self.t = self.cache.tokens_per_page
        self.rows: dict[str, torch.Tensor] = {}  # published key -> its page's data
        self.chains: dict[int, list[str]] = {}  # used slot -> keys of its leading pages
        self.published: list[list[str]] = []  # every chain published
        self.counter = 0

    def teardown(self) -> None:
        self.cache.close()

    @rule()
    def alloc(self) -> None:
        if self.cache.num_free_slots:
            self.chains[self.cache.alloc_slot()] = []

    @rule(data=st.data())
    @precondition(lambda self: bool(self.chains))
    def grow(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.chains)))
        have = self.cache.length(slot)
        n = data.draw(st.integers(have, min(have + 3 * self.t, self.cache.spec.max_seq_len)))
        try:
            self.cache.ensure(slot, n)
        except OutOfKVMemory:
            return
        shared = len(self.chains[slot]) * self.t
        if n > max(have, shared):  # write only tokens past what the slot already published
            self.counter += 1
            start = max(have, shared)
            for layer in range(2):
                vals = torch.full((n - start, 2, 16), float(self.counter + 10 * layer))
                self.cache.k_cache(layer)[slot, start:n] = vals

    @rule(data=st.data())
    @precondition(lambda self: bool(self.chains))
    def publish(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.chains)))
        full = self.cache.length(slot) // self.t
        chain = self.chains[slot]
        keys = chain + [f"{slot}-{self.counter}-{i}" for i in range(len(chain), full)]
        self.cache.cache_pages(slot, keys)
        for i, key in enumerate(keys):
            if key not in self.rows:
                self.rows[key] = self.cache.k_cache(0)[slot, i * self.t : (i + 1) * self.t].clone()
        self.chains[slot] = keys
        if keys:
            self.published.append(keys)

    @rule(data=st.data())
    @precondition(lambda self: bool(self.published) and self.cache.num_free_slots > 0)
    def share(self, data: st.DataObject) -> None:
        """Map the cached part of a published chain into a new slot, as an admission would."""
        chain = data.draw(st.sampled_from(self.published))
        n = self.cache.cached_prefix(chain)
        if not n:
            return
        if data.draw(st.booleans()):  # the scheduler's way: the slot comes with the rows
            slot = self.cache.alloc_slot(chain[:n])
            got = self.cache.length(slot)
        else:
            slot = self.cache.alloc_slot()
            got = self.cache.map_cached(slot, chain[:n])
        # all of them, but where they end inside a segment that cannot be split now
        assert got % self.t == 0 and (got == n * self.t or self.cache.segment_min_pages)
        assert got <= n * self.t
        self.chains[slot] = chain[: got // self.t]

    @rule(data=st.data())
    @precondition(lambda self: bool(self.published) and self.cache.num_free_slots > 0)
    def recompute(self, data: st.DataObject) -> None:
        """A request that computed a published chain's tokens itself (it was admitted before
        they were published) publishes them and one more page: its copies stay private, and
        so does every page after them (shared rows must lead its pages)."""
        chain = data.draw(st.sampled_from(self.published))
        n = self.cache.cached_prefix(chain)
        if not n:
            return
        slot = self.cache.alloc_slot()
        try:
            self.cache.ensure(slot, (n + 1) * self.t)
        except OutOfKVMemory:
            self.cache.free_slot(slot)
            return
        if self.cache.cached_prefix(chain) < n:  # backing it evicted those rows: no longer
            self.cache.free_slot(slot)  # the case this rule is about
            return
        for i, key in enumerate(chain[:n]):
            self.cache.k_cache(0)[slot, i * self.t : (i + 1) * self.t] = self.rows[key]
        self.counter += 1
        assert self.cache.cache_pages(slot, chain[:n] + [f"dup-{self.counter}"]) == 0
        self.chains[slot] = []

    @rule(data=st.data())
    @precondition(lambda self: bool(self.chains))
    def free(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.chains)))
        self.cache.free_slot(slot)
        del self.chains[slot]

    @rule()
    def trim(self) -> None:
        self.cache.trim()

    def check_saved(self, got: int, by_key: int) -> None:
        """Used slots' extra mappings of shared pages: one per extra slot mapping a key."""
        assert got == by_key

    @invariant()
    def consistent(self) -> None:
        self.cache.check_integrity()
        counts: dict[str, int] = {}
        for chain in self.chains.values():
            for key in chain:
                counts[key] = counts.get(key, 0) + 1
        saved = sum(c - 1 for c in counts.values()) * self.cache.layout.num_buffers * PAGE
        self.check_saved(self.cache.stats().shared_saved_bytes, saved)
        for slot, chain in self.chains.items():
            for i, key in enumerate(chain):
                page = self.cache.k_cache(0)[slot, i * self.t : (i + 1) * self.t]
                assert torch.equal(page, self.rows[key]), (slot, key)


SharingMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
test_sharing_state_machine = SharingMachine.TestCase


class SegmentMachine(SharingMachine):
    """The same operations with prefix segments from two pages on (hot prefixes are copied
    into one allocation per buffer and mapped whole): rows read the same through segments,
    and segments are given back when memory runs short, on trim, and never leak."""

    def __init__(self) -> None:
        super().__init__()
        self.cache.close()
        self.cache = _cache(layout="cross_layer", pages=24, slots=5, segment_min_pages=2)

    def check_saved(self, got: int, by_key: int) -> None:
        """A slot that mapped a key's page before a segment replaced it keeps that page, so
        the slots mapping a key share it only in part."""
        assert got <= by_key

    @rule(data=st.data(), cut=st.integers(0, 2))
    @precondition(lambda self: bool(self.published) and self.cache.num_free_slots > 1)
    def share_hot(self, data: st.DataObject, cut: int) -> None:
        """Two more admissions behind one published chain (the second finds it hot), the
        second maybe `cut` pages shorter (a segment's first pages)."""
        chain = data.draw(st.sampled_from(self.published))
        n = self.cache.cached_prefix(chain)
        for m in (n, n - cut):
            if m > 0 and self.cache.num_free_slots:
                slot = self.cache.alloc_slot(chain[:m])
                got = self.cache.length(slot) // self.t
                assert got <= m
                self.chains[slot] = chain[:got]

    @rule(data=st.data())
    @precondition(lambda self: bool(self.published) and self.cache.num_free_slots > 0)
    def share_part(self, data: st.DataObject) -> None:
        """An admission behind any leading part of a published chain (one that ends inside
        a segment splits it, memory permitting)."""
        chain = data.draw(st.sampled_from(self.published))
        n = self.cache.cached_prefix(chain)
        if n:
            m = data.draw(st.integers(1, n))
            slot = self.cache.alloc_slot(chain[:m])
            got = self.cache.length(slot) // self.t
            assert got <= m
            self.chains[slot] = chain[:got]


SegmentMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
test_segment_state_machine = SegmentMachine.TestCase


@pytest.mark.parametrize("layout", ["cross_layer", "per_layer"])
def test_hot_prefix_moves_into_one_segment(layout: str) -> None:
    """The third slot behind a prefix mapped by two gets it through a new segment (one
    mapping per buffer, filled by a copy) that replaces the table's pages, later ones reuse
    it, a shorter lookup splits it where it ends (a segment maps only whole), and every slot
    reads the published data."""
    with _cache(layout, pages=40, slots=6, segment_min_pages=2) as cache:
        t, nbuf = cache.tokens_per_page, cache.layout.num_buffers
        keys = ["s0", "s1", "s2", "s3"]
        a = cache.alloc_slot()
        cache.ensure(a, 4 * t + 3)
        _fill(cache, a, 4 * t + 3, 5.0)
        cache.cache_pages(a, keys)
        want = _read(cache, a, 4 * t)
        b = cache.alloc_slot(keys)  # the second mapper: page by page
        assert cache.stats().segment_bytes == 0
        maps = cache.stats().map_calls
        c = cache.alloc_slot(keys)  # hot now: a segment, one mapping per buffer
        st_ = cache.stats()
        assert st_.map_calls - maps == nbuf
        assert st_.segment_bytes == 4 * nbuf * PAGE and st_.segments_built == 1
        assert st_.prefix_bytes == 4 * nbuf * PAGE  # the table holds the segment alone
        maps = st_.map_calls
        d = cache.alloc_slot(keys)  # reuses it
        assert cache.stats().map_calls - maps == nbuf
        assert cache.stats().segments_built == 1
        # a lookup that ends inside it splits it: 3 + 1 pages, the old one goes with c and d
        e = cache.alloc_slot(keys[:3])
        st_ = cache.stats()
        assert st_.segments_split == 1 and st_.segment_bytes == (4 + 3 + 1) * nbuf * PAGE
        assert cache.length(e) == 3 * t
        maps = cache.stats().map_calls
        f = cache.alloc_slot(keys)  # both parts: two mappings per buffer
        assert cache.stats().map_calls - maps == 2 * nbuf
        for s in (b, c, d, f):
            assert torch.equal(_read(cache, s, 4 * t), want)
        assert torch.equal(_read(cache, e, 3 * t), want[:, : 3 * t])
        cache.ensure(c, 4 * t + 9)  # private pages after the segment
        cache.check_integrity()
        for s in (c, d):
            cache.free_slot(s)
        g = cache.alloc_slot(keys)  # reuses c's or d's slot: the split segment goes with it
        h = cache.alloc_slot(keys)
        assert torch.equal(_read(cache, g, 4 * t), want)
        assert cache.stats().segment_bytes == 4 * nbuf * PAGE
        cache.check_integrity()
        for s in (a, b, e, f, g, h):
            cache.free_slot(s)
        assert cache.trim() > 0
        st_ = cache.stats()
        assert st_.segment_bytes == 0 and st_.mapped_bytes == 0 and st_.prefix_bytes == 0
        cache.check_integrity()


def test_a_hot_prefix_is_held_once() -> None:
    """Once the slots that mapped a hot prefix's pages before its segment let go, those pages
    are back in the pool: the prefix's memory is the segment alone, however many share it."""
    with _cache(pages=40, slots=3, segment_min_pages=2) as cache:
        t, nbuf = cache.tokens_per_page, cache.layout.num_buffers
        keys = ["s0", "s1", "s2", "s3"]
        a = cache.alloc_slot()
        cache.ensure(a, 4 * t)
        _fill(cache, a, 4 * t, 2.0)
        cache.cache_pages(a, keys)
        want = _read(cache, a, 4 * t)
        b = cache.alloc_slot(keys)
        c = cache.alloc_slot(keys)  # builds the segment
        cache.free_slot(a)
        cache.free_slot(b)
        x = cache.alloc_slot()  # every free slot maps old pages: they are unmapped first
        y = cache.alloc_slot()
        cache.ensure(x, t)
        cache.ensure(y, t)
        st_ = cache.stats()
        assert st_.prefix_bytes == st_.segment_bytes == 4 * nbuf * PAGE
        held = st_.created_bytes - st_.pool_free_bytes  # pages mapped or in the table
        assert held == 2 * nbuf * PAGE  # x's and y's own page: the old prefix pages are free
        cache.free_slot(c)
        z = cache.alloc_slot(keys)
        assert torch.equal(_read(cache, z, 4 * t), want)
        cache.check_integrity()


def test_a_chain_that_branches_inside_a_segment_splits_it() -> None:
    """Chain B shares the first two pages of chain A and goes on with its own; once A's four
    pages move into a segment, a lookup of B (segment rows, then B's own page rows) splits
    the segment where B branches off instead of mapping A's third page as B's."""
    with _cache(pages=40, slots=6, segment_min_pages=3) as cache:
        t = cache.tokens_per_page
        a_keys, b_keys = ["x0", "x1", "a2", "a3"], ["x0", "x1", "b2", "b3"]
        a = cache.alloc_slot()
        cache.ensure(a, 4 * t)
        _fill(cache, a, 4 * t, 1.0)
        cache.cache_pages(a, a_keys)
        b = cache.alloc_slot(b_keys[:2])  # B: A's first two pages, then its own
        cache.ensure(b, 4 * t)
        for layer in range(cache.spec.num_layers):
            cache.k_cache(layer)[b, 2 * t : 4 * t] = 77.0
        cache.cache_pages(b, b_keys)
        want_b = _read(cache, b, 4 * t)
        c = cache.alloc_slot(a_keys)  # only A's first two pages are hot: too few
        assert cache.stats().segments_built == 0
        d = cache.alloc_slot(a_keys)  # all four are hot: they move into a segment
        assert cache.stats().segments_built == 1
        e = cache.alloc_slot(b_keys)
        assert cache.length(e) == 4 * t and cache.stats().segments_split == 1
        assert torch.equal(_read(cache, e, 4 * t), want_b)
        for s in (c, d):
            assert torch.equal(_read(cache, s, 4 * t), _read(cache, a, 4 * t))
        cache.check_integrity()


def test_idle_segments_are_evicted_whole_in_lru_order() -> None:
    """Under a tight budget an idle segment is evicted whole (its keys leave the table) when
    it is the least recently used, and a request that needs the memory gets it."""
    with _cache(pages=16, slots=5, segment_min_pages=2) as cache:
        t = cache.tokens_per_page
        keys = ["s0", "s1", "s2"]
        a = cache.alloc_slot()
        cache.ensure(a, 3 * t)
        _fill(cache, a, 3 * t, 1.0)
        cache.cache_pages(a, keys)
        b = cache.alloc_slot(keys)
        c = cache.alloc_slot(keys)
        assert cache.stats().segment_bytes > 0
        for s in (a, b, c):
            cache.free_slot(s)
        x, y = cache.alloc_slot(), cache.alloc_slot()
        cache.ensure(x, 10 * t)
        assert cache.stats().segment_bytes > 0  # memory to spare so far: it stays
        cache.ensure(y, 5 * t)  # 3 + 10 + 5 of 16 pages: the segment's budget is needed
        assert cache.stats().segment_bytes == 0
        assert cache.cached_prefix(keys) == 0
        cache.check_integrity()


def test_a_hot_system_prompt_before_private_turns_gets_a_segment() -> None:
    """Two conversations share a 4-page system prompt, each with pages of its own: a third
    admission that continues one of them maps the hot system part through a new segment and
    its conversation's pages one by one."""
    with _cache(pages=40, slots=4, segment_min_pages=2) as cache:
        t, nbuf = cache.tokens_per_page, cache.layout.num_buffers
        system = ["s0", "s1", "s2", "s3"]
        a = cache.alloc_slot()
        cache.ensure(a, 6 * t)
        _fill(cache, a, 6 * t, 3.0)
        cache.cache_pages(a, system + ["a0", "a1"])
        want = _read(cache, a, 6 * t)
        b = cache.alloc_slot(system)
        cache.ensure(b, 6 * t)
        cache.cache_pages(b, system + ["b0", "b1"])
        maps = cache.stats().map_calls
        c = cache.alloc_slot(system + ["a0", "a1"])  # conversation a's next turn
        assert cache.stats().map_calls - maps == nbuf + 2 * nbuf  # the segment, then 2 pages
        assert cache.stats().segment_bytes == 4 * nbuf * PAGE
        assert torch.equal(_read(cache, c, 6 * t), want)
        cache.check_integrity()


def test_shared_prefix_groups_the_slots_that_map_one_segment() -> None:
    """Cascade decoding's groups: slots whose first pages are one segment, or the same rows
    page by page (a slot that maps nothing shared is left out; of two groups of one size, the
    segment's)."""
    with _cache(pages=40, slots=6, segment_min_pages=2) as cache:
        t = cache.tokens_per_page
        keys = ["s0", "s1", "s2"]
        a = cache.alloc_slot()
        cache.ensure(a, 3 * t + 1)
        cache.cache_pages(a, keys)
        b = cache.alloc_slot(keys)  # page by page: the rows are hot now
        assert cache.shared_prefix([a, b]) == (3 * t, [0, 1])
        c, d = cache.alloc_slot(keys), cache.alloc_slot(keys)  # through the new segment
        lone = cache.alloc_slot()
        cache.ensure(lone, 5)
        assert cache.shared_prefix([lone, a, c, b, d]) == (3 * t, [2, 4])
        assert cache.shared_prefix([c, lone]) is None  # a group of one


def test_shared_prefix_page_by_page_is_the_common_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without segments a group's shared pages are the leading rows all its members map,
    compared up to `SHARED_SCAN_PAGES` pages (fewer is still correct for the kernel)."""
    from vattention.kvcache import sharing

    with _cache(pages=40, slots=5, segment_min_pages=0) as cache:
        t = cache.tokens_per_page
        a = cache.alloc_slot()
        cache.ensure(a, 4 * t)
        cache.cache_pages(a, ["s0", "s1", "s2", "s3"])
        b = cache.alloc_slot(["s0", "s1", "s2"])
        cache.ensure(b, 4 * t)  # its own fourth page
        c = cache.alloc_slot(["s0", "s1"])
        cache.ensure(c, 3 * t)
        assert cache.stats().segment_bytes == 0
        assert cache.shared_prefix([a, b]) == (3 * t, [0, 1])
        assert cache.shared_prefix([c, a, b]) == (2 * t, [0, 1, 2])
        monkeypatch.setattr(sharing, "SHARED_SCAN_PAGES", 1)
        assert cache.shared_prefix([a, b]) == (t, [0, 1])
        cache.check_integrity()


def test_paged_shared_prefix_is_the_common_run_of_leading_blocks() -> None:
    from vattention.kvcache.paged import PagedKVCache

    spec = _spec(slots=5)
    with PagedKVCache(spec, 16, num_blocks=40, device="cpu") as cache:
        a = cache.alloc_slot()
        cache.ensure(a, 50)
        cache.cache_pages(a, ["b0", "b1", "b2"])
        b = cache.alloc_slot(["b0", "b1", "b2"])
        cache.ensure(b, 60)
        c = cache.alloc_slot(["b0", "b1"])  # shares only two blocks
        cache.ensure(c, 40)
        lone = cache.alloc_slot()
        cache.ensure(lone, 20)
        assert cache.shared_prefix([a, b]) == (48, [0, 1])
        assert cache.shared_prefix([lone, a, b, c]) == (32, [1, 2, 3])
        assert cache.shared_prefix([lone, c]) is None
        empty = cache.alloc_slot()  # no block yet (the padding block first): in no group
        assert cache.shared_prefix([empty, lone]) is None
