"""VirtualKVCache behaviour on every backend: data, layouts, slots, budget, async, teardown."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kvcache.helpers import BACKENDS, make_spec
from vattention import KVCacheSpec, OutOfKVMemory, VirtualKVCache


def tokens_per_page(cache: VirtualKVCache) -> int:
    return int(cache.layout.tokens_per_page)


def fill(cache: VirtualKVCache, slot: int, start: int, stop: int, seed: int) -> None:
    for layer in range(cache.spec.num_layers):
        for i, t in enumerate((cache.k_cache(layer), cache.v_cache(layer))):
            g = torch.Generator().manual_seed(seed * 1000 + layer * 10 + i)
            vals = torch.randn(stop - start, *t.shape[2:], generator=g).to(t.dtype)
            t[slot, start:stop] = vals.to(t.device)


def expected(cache: VirtualKVCache, start: int, stop: int, seed: int) -> list[torch.Tensor]:
    out = []
    for layer in range(cache.spec.num_layers):
        for i, t in enumerate((cache.k_cache(layer), cache.v_cache(layer))):
            g = torch.Generator().manual_seed(seed * 1000 + layer * 10 + i)
            out.append(torch.randn(stop - start, *t.shape[2:], generator=g).to(t.dtype))
    return out


def read(cache: VirtualKVCache, slot: int, start: int, stop: int) -> list[torch.Tensor]:
    return [
        t[slot, start:stop].cpu()
        for layer in range(cache.spec.num_layers)
        for t in (cache.k_cache(layer), cache.v_cache(layer))
    ]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=False):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("layout", ["cross_layer", "cross_layer_kv", "per_layer"])
def test_data_survives_growth_free_reuse_and_reclaim(kind: str, layout: str) -> None:
    spec = make_spec(kind, layout)
    with VirtualKVCache(spec, kind, budget_bytes=1 << 40) as cache:
        tpp = tokens_per_page(cache)
        a, b = cache.alloc_slot(), cache.alloc_slot()
        n1 = min(tpp + 3, spec.max_seq_len)
        cache.ensure(a, n1)
        fill(cache, a, 0, n1, seed=1)
        cache.ensure(b, 5)
        fill(cache, b, 0, 5, seed=2)
        cache.ensure(a, spec.max_seq_len)  # grow a across more pages
        fill(cache, a, n1, spec.max_seq_len, seed=3)
        assert_same(read(cache, a, 0, n1), expected(cache, 0, n1, 1))
        assert_same(read(cache, a, n1, spec.max_seq_len), expected(cache, n1, spec.max_seq_len, 3))
        assert_same(read(cache, b, 0, 5), expected(cache, 0, 5, 2))
        # Free a: its pages stay mapped, and the next allocation gets it back with the data.
        cache.free_slot(a)
        assert cache.stats().reclaimable_bytes > 0
        again = cache.alloc_slot()
        assert again == a
        cache.ensure(again, n1)
        assert_same(read(cache, again, 0, n1), expected(cache, 0, n1, 1))
        cache.check_integrity()


@pytest.mark.parametrize("kind", BACKENDS)
def test_layouts_agree(kind: str) -> None:
    spec_x = make_spec(kind, "cross_layer")
    spec_p = make_spec(kind, "per_layer")
    with (
        VirtualKVCache(spec_x, kind, budget_bytes=1 << 40) as cx,
        VirtualKVCache(spec_p, kind, budget_bytes=1 << 40) as cp,
    ):
        for cache in (cx, cp):
            s = cache.alloc_slot()
            cache.ensure(s, 123)
            fill(cache, s, 0, 123, seed=7)
        assert_same(read(cx, 0, 0, 123), read(cp, 0, 0, 123))
        for layer in range(spec_x.num_layers):
            # Never let pytest repr a cache view: it would read unmapped memory.
            kx, kp = cx.k_cache(layer), cp.k_cache(layer)
            shape = (spec_x.max_slots, spec_x.max_seq_len, spec_x.num_kv_heads, spec_x.head_dim)
            assert tuple(kx.shape) == shape and tuple(kp.shape) == shape
            row = spec_x.num_kv_heads * spec_x.head_dim
            # cross-layer: consecutive tokens of one layer are `layers` rows apart.
            assert kx.stride()[1:] == (spec_x.num_layers * row, spec_x.head_dim, 1)
            assert kp.stride()[1:] == (row, spec_x.head_dim, 1)
            assert kx.data_ptr() % 16 == 0 and kp.data_ptr() % 16 == 0
        # A cross-layer page holds `layers` times fewer tokens than a per-layer page... per buffer,
        # but the per-layer layout maps 2*layers buffers instead of 2.
        assert cp.layout.num_buffers == spec_x.num_layers * cx.layout.num_buffers
        assert cp.stats().mapped_bytes >= cx.stats().mapped_bytes


@pytest.mark.parametrize("kind", BACKENDS)
def test_views_never_move(kind: str) -> None:
    spec = make_spec(kind)
    with VirtualKVCache(spec, kind, budget_bytes=1 << 40) as cache:
        ptrs = [cache.k_cache(i).data_ptr() for i in range(spec.num_layers)]
        s = cache.alloc_slot()
        cache.ensure(s, spec.max_seq_len)
        cache.free_slot(s)
        cache.trim()
        assert ptrs == [cache.k_cache(i).data_ptr() for i in range(spec.num_layers)]


@pytest.mark.parametrize("kind", BACKENDS)
def test_alloc_prefers_slot_with_most_pages(kind: str) -> None:
    spec = make_spec(kind)
    with VirtualKVCache(spec, kind, budget_bytes=1 << 40) as cache:
        slots = [cache.alloc_slot() for _ in range(3)]
        cache.ensure(slots[0], 1)
        cache.ensure(slots[1], spec.max_seq_len)
        for s in slots:
            cache.free_slot(s)
        assert cache.alloc_slot() == slots[1]
        assert cache.alloc_slot() == slots[0]


@pytest.mark.parametrize("kind", BACKENDS)
def test_alloc_with_a_size_takes_the_best_fitting_slot(kind: str) -> None:
    """`alloc_slot(tokens=n)`: the free slot with the fewest pages that still cover n tokens
    and the look-ahead (no map call, least left over); the largest if none covers them."""
    spec = make_spec(kind)
    with VirtualKVCache(spec, kind, budget_bytes=1 << 40, lookahead_tokens=0) as cache:
        per = cache.layout.pages_for(1)  # 1 page per buffer holds this many tokens:
        t = int(cache.layout.tokens_per_page)
        assert per == 1 and spec.max_seq_len >= 4 * t
        small, mid, big = (cache.alloc_slot() for _ in range(3))
        cache.ensure(small, t)
        cache.ensure(mid, 2 * t)
        cache.ensure(big, 4 * t)
        for s in (small, mid, big):
            cache.free_slot(s)
        calls = cache.stats().map_calls
        a = cache.alloc_slot(tokens=t + 1)  # needs 2 pages: mid fits best
        assert a == mid
        cache.ensure(a, t + 1)
        assert cache.stats().map_calls == calls
        assert cache.alloc_slot(tokens=3 * t) == big  # only big covers it
        assert cache.alloc_slot(tokens=8 * t) == small  # none covers it: the most pages left
        cache.check_integrity()


@pytest.mark.parametrize("kind", BACKENDS)
def test_out_of_memory_is_all_or_nothing(kind: str) -> None:
    spec = make_spec(kind)
    probe = VirtualKVCache(spec, kind, budget_bytes=0)
    per_page = probe.layout.num_buffers * probe.page_size
    probe.close()
    budget = 3 * per_page  # room for 3 page-rows (every buffer) in all
    with VirtualKVCache(spec, kind, budget_bytes=budget) as cache:
        tpp = tokens_per_page(cache)
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.ensure(a, 2 * tpp)
        fill(cache, a, 0, 2 * tpp, seed=5)
        before = cache.stats()
        with pytest.raises(OutOfKVMemory) as err:
            cache.step({a: 2 * tpp, b: 2 * tpp})  # needs 2 more page-rows, 1 left
        assert "asked" in str(err.value) and err.value.pages_needed > err.value.pages_available
        assert cache.stats() == before
        assert cache.mapped_pages(b) == 0 and cache.length(b) == 0
        assert_same(read(cache, a, 0, 2 * tpp), expected(cache, 0, 2 * tpp, 5))
        cache.ensure(b, tpp)  # what fits still works
        cache.check_integrity()


@pytest.mark.parametrize("kind", BACKENDS)
def test_reclaims_free_slots_only_when_pool_runs_dry(kind: str) -> None:
    spec = make_spec(kind)
    with VirtualKVCache(spec, kind, budget_bytes=1 << 40) as cache:
        per_row = cache.layout.num_buffers * cache.page_size
    with VirtualKVCache(spec, kind, budget_bytes=4 * per_row, pool_batch=1) as cache:
        tpp = tokens_per_page(cache)
        a = cache.alloc_slot()
        cache.ensure(a, 3 * tpp)
        cache.free_slot(a)
        b = cache.alloc_slot()
        assert b == a  # most pages
        c = cache.alloc_slot()
        cache.ensure(c, tpp)  # from the budget: a's pages stay
        assert cache.mapped_pages(b) == 3
        cache.free_slot(b)
        d = cache.alloc_slot()
        assert d == b
        e = cache.alloc_slot()
        cache.free_slot(d)
        cache.ensure(e, 2 * tpp)  # budget used up: must reclaim from free slot d
        assert cache.mapped_pages(d) == 1 and cache.mapped_pages(e) == 2
        assert cache.stats().unmap_calls == 2 * cache.layout.num_buffers
        cache.check_integrity()


def test_reclaim_waits_for_each_free_slot_and_never_for_the_whole_device() -> None:
    """Reclaiming a free slot's pages first waits for the event `free_slot` recorded (work
    queued before the free may still read them), not for the whole device; trimming a used
    slot's look-ahead waits for nothing (no queued work touches tokens past its length)."""
    from vattention.memory.cpu import CpuBackend

    calls: list[tuple[str, object]] = []

    class Recording(CpuBackend):
        def record_event(self) -> object:
            token = object()
            calls.append(("record", token))
            return token

        def wait_event(self, event: object) -> None:
            calls.append(("wait", event))

        def synchronize(self) -> None:
            calls.append(("sync", None))

        def unmap(self, addr: int) -> None:
            calls.append(("unmap", addr))
            super().unmap(addr)

    spec = make_spec("cpu")
    per_row = 2 * 64 * 1024  # K and V pages of one page-step (cross-layer, 64 KiB CPU pages)
    with Recording(64 * 1024) as backend:
        cache = VirtualKVCache(spec, backend, budget_bytes=3 * per_row, lookahead_tokens=0)
        tpp = tokens_per_page(cache)
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.ensure(a, 2 * tpp)
        cache.ensure(b, tpp)
        cache.free_slot(a)
        freed = [t for kind, t in calls if kind == "record"][-1]
        calls.clear()
        cache.ensure(b, 3 * tpp)  # the budget is used up: a's pages come back
        kinds = [kind for kind, _ in calls]
        assert "sync" not in kinds
        assert ("wait", freed) in calls and kinds.index("wait") < kinds.index("unmap")
        cache.check_integrity()
        cache.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_trim_returns_memory(kind: str) -> None:
    spec = make_spec(kind)
    with VirtualKVCache(spec, kind, budget_bytes=1 << 40) as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.ensure(a, spec.max_seq_len)
        cache.ensure(b, 10)
        cache.prefill_pool(4)
        cache.free_slot(a)
        kept = cache.stats().used_mapped_bytes
        released = cache.trim()
        st = cache.stats()
        assert released > 0
        assert st.created_bytes == st.mapped_bytes == kept
        assert st.pool_free_bytes == 0 and st.reclaimable_bytes == 0
        cache.check_integrity()


@pytest.mark.parametrize("mapping", ["thread", "inline"])
@pytest.mark.parametrize("kind", BACKENDS)
def test_step_async_maps_ahead_and_reports_oom_on_wait(kind: str, mapping: str) -> None:
    spec = make_spec(kind)
    probe = VirtualKVCache(spec, kind, budget_bytes=0)
    tpp = tokens_per_page(probe)
    probe.close()
    with VirtualKVCache(
        spec, kind, budget_bytes=1 << 40, lookahead_tokens=2 * tpp, mapping=mapping
    ) as cache:
        s = cache.alloc_slot()
        cache.step_async({s: 1})
        cache.wait(interrupt=False)
        assert cache.length(s) == 1
        assert cache.mapped_pages(s) == cache.layout.pages_for(1 + 2 * tpp)  # eager look-ahead
        cache.step_async([tpp + 1 if i == s else 0 for i in range(spec.max_slots)])
        cache.wait(interrupt=False)
        assert cache.length(s) == tpp + 1
    with VirtualKVCache(spec, kind, budget_bytes=0, mapping=mapping) as cache:
        s = cache.alloc_slot()
        cache.step_async({s: 1})
        with pytest.raises(OutOfKVMemory):
            cache.wait()
        cache.wait()  # the error is reported once
        cache.check_integrity()


@pytest.mark.parametrize("kind", BACKENDS)
def test_concurrent_use_keeps_accounting(kind: str) -> None:
    spec = make_spec(kind, max_slots=8)
    with VirtualKVCache(spec, kind, budget_bytes=1 << 40) as cache:
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            try:
                for i in range(20):
                    s = cache.alloc_slot()
                    cache.ensure(s, (seed * 37 + i * 11) % spec.max_seq_len + 1)
                    cache.free_slot(s)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        keep = cache.alloc_slot()
        for t in threads:
            t.start()
        for n in range(1, 200, 17):
            cache.step_async({keep: n})
            cache.wait()
        for t in threads:
            t.join()
        assert not errors
        assert cache.num_free_slots == spec.max_slots - 1
        cache.check_integrity()


@pytest.mark.parametrize("kind", BACKENDS)
def test_bad_arguments_raise_clear_errors(kind: str) -> None:
    spec = make_spec(kind)
    with VirtualKVCache(spec, kind, budget_bytes=1 << 40) as cache:
        s = cache.alloc_slot()
        before = cache.stats()
        with pytest.raises(ValueError, match="out of range"):
            cache.ensure(spec.max_slots, 1)
        with pytest.raises(ValueError, match="out of range"):
            cache.ensure(-1, 1)
        with pytest.raises(ValueError, match="max_seq_len"):
            cache.ensure(s, spec.max_seq_len + 1)
        with pytest.raises(ValueError, match="max_seq_len"):
            cache.ensure(s, -3)
        with pytest.raises(ValueError, match="not allocated"):
            cache.ensure((s + 1) % spec.max_slots, 1)
        with pytest.raises(ValueError, match="entries"):
            cache.step([1, 2])
        with pytest.raises(TypeError):
            cache.step(5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_seq_len"):
            cache.step_async({s: spec.max_seq_len + 1})
        with pytest.raises(ValueError, match="layer"):
            cache.k_cache(spec.num_layers)
        assert cache.stats() == before
        cache.free_slot(s)
        after_free = cache.stats()
        with pytest.raises(ValueError, match="freed twice"):
            cache.free_slot(s)
        assert cache.stats() == after_free
        for _ in range(spec.max_slots):
            cache.alloc_slot()
        with pytest.raises(OutOfKVMemory, match="no free slot"):
            cache.alloc_slot()
    with pytest.raises(RuntimeError, match="closed"):
        cache.alloc_slot()
    with pytest.raises(ValueError, match="budget_fraction"):
        VirtualKVCache(spec, kind, budget_fraction=1.5)
    with pytest.raises(ValueError, match="not both"):
        VirtualKVCache(spec, kind, budget_bytes=1, budget_fraction=0.5)
    with pytest.raises(TypeError, match="KVCacheSpec"):
        VirtualKVCache("spec", kind)  # type: ignore[arg-type]


def test_spec_validation() -> None:
    ok = dict(num_layers=2, num_kv_heads=2, head_dim=8, max_slots=2, max_seq_len=16)
    assert KVCacheSpec(**ok, dtype="bf16").dtype == torch.bfloat16  # type: ignore[arg-type]
    for field, bad in [
        ("num_layers", 0),
        ("head_dim", -1),
        ("max_slots", 1.5),
        ("max_seq_len", True),
    ]:
        with pytest.raises(ValueError, match=field):
            KVCacheSpec(**{**ok, field: bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layout"):
        KVCacheSpec(**ok, layout="paged")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="power of two"):
        KVCacheSpec(**ok, page_size=3000)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        KVCacheSpec(**ok, dtype="int8")  # type: ignore[arg-type]


@pytest.mark.parametrize("mapping", ["thread", "inline"])
@pytest.mark.parametrize("kind", BACKENDS)
def test_step_async_prepares_free_slots_for_upcoming_requests(kind: str, mapping: str) -> None:
    spec = make_spec(kind)
    with VirtualKVCache(
        spec, kind, budget_bytes=1 << 40, lookahead_tokens=0, mapping=mapping
    ) as cache:
        tpp = tokens_per_page(cache)
        running = cache.alloc_slot()
        cache.step_async({running: 1}, reserve=[3 * tpp, tpp])
        cache.wait(interrupt=False)
        first, second = cache.alloc_slot(), cache.alloc_slot()
        # alloc_slot hands out the prepared slots, most pages first: admission maps nothing.
        assert cache.mapped_pages(first) == cache.layout.pages_for(3 * tpp)
        assert cache.mapped_pages(second) == cache.layout.pages_for(tpp)
        calls = cache.stats().map_calls
        cache.step({first: 3 * tpp, second: tpp})
        assert cache.stats().map_calls == calls
        cache.check_integrity()


def test_wait_interrupts_eager_work_but_not_the_required_part() -> None:
    spec = make_spec("cpu", max_slots=4)
    with VirtualKVCache(spec, "cpu", budget_bytes=1 << 40, eager_map_calls=2) as cache:
        s = cache.alloc_slot()
        for n in range(1, spec.max_seq_len, 97):
            cache.step_async({s: n}, reserve=[spec.max_seq_len] * 3)
            cache.wait()  # interrupts look-ahead and reservations, never the step itself
            assert cache.length(s) == n and cache.mapped_pages(s) >= cache.layout.pages_for(n)
            cache.check_integrity()


def test_inline_mapping_caps_eager_work_per_call_and_resumes() -> None:
    spec = make_spec("cpu", max_slots=4)
    with VirtualKVCache(
        spec, "cpu", budget_bytes=1 << 40, lookahead_tokens=0, eager_map_calls=2,
        mapping="inline", inline_eager_pieces=1,
    ) as cache:  # fmt: skip
        nbuf = cache.layout.num_buffers
        per_piece = max(1, 2 // nbuf)  # pages a piece maps
        s = cache.alloc_slot()
        want = cache.layout.pages_for(spec.max_seq_len)
        free = [slot for slot in range(spec.max_slots) if slot != s]
        mapped = [0]
        for _ in range(3):
            cache.step_async({s: 1}, reserve=[spec.max_seq_len])
            cache.wait()  # nothing runs in the background: nothing to join
            mapped.append(max(cache.mapped_pages(f) for f in free))
            cache.check_integrity()
        # The required part is always done; the reservation grows one piece per call.
        assert cache.length(s) == 1
        assert mapped[1:] == [min(want, k * per_piece) for k in (1, 2, 3)]
    with pytest.raises(ValueError, match="mapping"):
        VirtualKVCache(spec, "cpu", mapping="magic")


def test_look_ahead_trigger_maps_in_bursts() -> None:
    spec = make_spec("cpu", "per_layer", max_slots=2, max_seq_len=4096)
    probe = VirtualKVCache(spec, "cpu", budget_bytes=0)
    tpp = tokens_per_page(probe)
    probe.close()
    with pytest.raises(ValueError, match="lookahead_trigger_tokens"):
        VirtualKVCache(spec, "cpu", lookahead_tokens=tpp, lookahead_trigger_tokens=tpp + 1)
    opts = {"lookahead_tokens": 2 * tpp, "lookahead_trigger_tokens": tpp}
    with VirtualKVCache(spec, "cpu", budget_bytes=1 << 40, **opts) as cache:
        s = cache.alloc_slot()
        cache.step_async({s: 1})
        cache.wait(interrupt=False)
        first = cache.mapped_pages(s)
        assert first == cache.layout.pages_for(1 + 2 * tpp)
        # While more than the trigger's worth is backed ahead, steps map nothing.
        n = 1
        while cache.mapped_pages(s) * tpp - (n + 1) >= tpp:
            n += 1
            calls = cache.stats().map_calls
            cache.step_async({s: n})
            cache.wait(interrupt=False)
            assert cache.stats().map_calls == calls and cache.mapped_pages(s) == first
        # Below it, one burst tops the slot up to the full look-ahead again.
        n += 1
        cache.step_async({s: n})
        cache.wait(interrupt=False)
        assert cache.mapped_pages(s) == cache.layout.pages_for(n + 2 * tpp) > first
        cache.check_integrity()


def test_cache_stays_usable_while_eager_mapping_runs() -> None:
    spec = make_spec("cpu", max_slots=4)
    with VirtualKVCache(spec, "cpu", budget_bytes=1 << 40, eager_map_calls=2) as cache:
        for n in range(1, spec.max_seq_len - 200, 53):
            a, b = cache.alloc_slot(), cache.alloc_slot()
            cache.step_async({a: n, b: n}, reserve=[spec.max_seq_len] * 2)
            cache.free_slot(a)  # while the job may still map ahead for it
            c = cache.alloc_slot()
            cache.step({b: n + 1, c: n + 2})
            assert cache.length(b) == n + 1 and cache.length(c) == n + 2
            cache.wait(interrupt=False)
            cache.check_integrity()
            cache.free_slot(b)
            cache.free_slot(c)
        cache.check_integrity()


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 300)), min_size=1, max_size=30))
def test_stats_account_for_every_mapped_byte(ops: list[tuple[int, int]]) -> None:
    """`used_mapped = live + slack + lookahead` and `prepared <= reclaimable`, whatever was
    done; slack stays under one page per buffer per used slot."""
    spec = make_spec("cpu", max_slots=4, max_seq_len=512)
    with VirtualKVCache(spec, "cpu", budget_bytes=1 << 40, lookahead_tokens=64,
                        mapping="inline") as cache:  # fmt: skip
        held: list[int] = []
        for kind, n in ops:
            if kind == 0 and cache.num_free_slots:
                held.append(cache.alloc_slot())
            elif kind == 1 and held:
                cache.free_slot(held.pop(n % len(held)))
            elif kind == 2 and held:
                s = held[n % len(held)]
                cache.step_async({s: max(cache.length(s), n)}, reserve=[n])
            elif held:
                cache.ensure(held[n % len(held)], n)
            st_ = cache.stats()
            assert st_.used_mapped_bytes == st_.live_bytes + st_.slack_bytes + st_.lookahead_bytes
            assert st_.slack_bytes >= 0 and st_.lookahead_bytes >= 0
            assert (
                st_.slack_bytes
                < max(1, st_.slots_used) * cache.page_size * cache.layout.num_buffers
            )
            assert 0 <= st_.prepared_bytes <= st_.reclaimable_bytes
            assert st_.mapped_bytes == st_.used_mapped_bytes + st_.reclaimable_bytes
        cache.check_integrity()


def test_prepared_pages_are_reported_apart_from_leftovers() -> None:
    spec = make_spec("cpu", max_slots=3)
    with VirtualKVCache(spec, "cpu", budget_bytes=1 << 40, lookahead_tokens=0) as cache:
        tpp = tokens_per_page(cache)
        a = cache.alloc_slot()
        cache.ensure(a, 2 * tpp)
        cache.free_slot(a)  # leftovers: reclaimable, not prepared
        st_ = cache.stats()
        assert st_.reclaimable_bytes > 0 and st_.prepared_bytes == 0
        b = cache.alloc_slot()  # takes a's pages (most mapped)
        cache.step_async({b: 1}, reserve=[3 * tpp])
        cache.wait(interrupt=False)
        st_ = cache.stats()
        want = cache.layout.pages_for(3 * tpp) * cache.layout.num_buffers * cache.page_size
        assert st_.prepared_bytes == want == st_.reclaimable_bytes
        assert (
            st_.lookahead_bytes
            == st_.used_mapped_bytes - cache.page_size * cache.layout.num_buffers
        )
        c = cache.alloc_slot()  # handed the prepared slot: no longer "prepared"
        assert cache.mapped_pages(c) == cache.layout.pages_for(3 * tpp)
        assert cache.stats().prepared_bytes == 0


def test_look_ahead_yields_before_a_step_runs_out_of_memory() -> None:
    """When the pool is short, other used slots' look-ahead pages are taken back (never their
    live tokens' pages) before `ensure` reports `OutOfKVMemory`."""
    spec = make_spec("cpu", max_slots=3, max_seq_len=2048)
    probe = VirtualKVCache(spec, "cpu", budget_bytes=0)
    tpp, nbuf = tokens_per_page(probe), probe.layout.num_buffers
    page = probe.page_size
    probe.close()
    total = 6  # pages per buffer in the whole budget
    with VirtualKVCache(
        spec, "cpu", budget_bytes=total * nbuf * page, lookahead_tokens=3 * tpp, mapping="inline"
    ) as cache:
        a = cache.alloc_slot()
        cache.step_async({a: 1})  # a: 1 live page plus look-ahead
        cache.wait()
        held = cache.mapped_pages(a)
        assert held >= 3 and cache.stats().lookahead_bytes == (held - 1) * nbuf * page
        b = cache.alloc_slot()
        want = total - held + 2  # two more pages than the pool has left: a yields two
        cache.ensure(b, want * tpp)
        assert cache.mapped_pages(b) == cache.layout.pages_for(want * tpp)
        assert cache.mapped_pages(a) == held - 2 and cache.length(a) == 1
        assert cache.can_fit({b: (want + held - 3) * tpp})  # a's remaining spare would do
        with pytest.raises(OutOfKVMemory):  # it would need a's live page: refused, unchanged
            cache.ensure(b, total * tpp)
        assert cache.mapped_pages(a) == held - 2 and cache.length(a) == 1
        cache.check_integrity()


def test_a_step_keeps_the_pages_of_the_lengths_it_sets() -> None:
    """Pages a slot holds beyond its length are look-ahead that a short pool may take back,
    but not when the same step raises the slot's length over them: a one-page budget, slot a
    back at length 0 with its page, then a step giving a and b one token each must fail (it
    once handed a's page to b, succeeded, and left a's token unbacked)."""
    spec = make_spec("cpu", max_slots=2)
    probe = VirtualKVCache(spec, "cpu", budget_bytes=0)
    nbuf, page = probe.layout.num_buffers, probe.page_size
    probe.close()
    with VirtualKVCache(spec, "cpu", budget_bytes=nbuf * page, lookahead_tokens=0) as cache:
        a = cache.alloc_slot()
        cache.step({a: 1})
        cache.ensure(a, 0)  # a keeps its page, now spare
        b = cache.alloc_slot()
        assert not cache.can_fit({a: 1, b: 1})
        with pytest.raises(OutOfKVMemory):
            cache.step({a: 1, b: 1})
        assert (cache.mapped_pages(a), cache.length(a), cache.mapped_pages(b)) == (1, 0, 0)
        cache.step({b: 1})  # a's spare page may go to b when a needs none
        assert (cache.mapped_pages(a), cache.mapped_pages(b)) == (0, 1)
        cache.check_integrity()


def test_a_late_background_job_never_rewrites_a_newer_length() -> None:
    """The mapping thread's job for a step's predicted lengths may run after the caller moved
    on (the engine schedules the next step before joining it): it must not give a slot handed
    out again meanwhile its old request's length, nor shorten a length the caller set since.
    (Both happened: prefix caching then published pages past a slot's length.)"""
    spec = make_spec("cpu")
    with VirtualKVCache(spec, "cpu", budget_bytes=1 << 30, lookahead_tokens=0,
                        mapping="thread") as cache:  # fmt: skip
        a = cache.alloc_slot()
        cache.ensure(a, 10)
        with cache._lock:  # the job waits for the lock until the caller is done
            cache.step_async({a: 11})
            cache.free_slot(a)
            b = cache.alloc_slot()
            assert b == a  # the same slot, another request
            cache.ensure(b, 3)
        cache.wait()
        assert cache.length(b) == 3
        with cache._lock:
            cache.step_async({b: 4})
            cache.step({b: 40})  # the caller's next step, longer than predicted
        cache.wait()
        assert cache.length(b) == 40
        cache.check_integrity()
