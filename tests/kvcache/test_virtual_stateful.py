"""Property-based test: random alloc/free/ensure/step/step_async/trim sequences.

After every step the cache's accounting must match a simple model, no page may leak, the data
written into used slots must survive whatever happened to other slots, and every
`OutOfKVMemory` must leave the state exactly as it was.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.kvcache.helpers import CPU_PAGE, make_spec
from vattention import OutOfKVMemory, VirtualKVCache


def _snapshot(cache: VirtualKVCache) -> tuple[object, ...]:
    n = cache.spec.max_slots
    return (
        cache.stats(),
        tuple(cache.mapped_pages(s) for s in range(n)),
        tuple(cache.length(s) for s in range(n)),
        cache.num_free_slots,
    )


class CacheMachine(RuleBasedStateMachine):
    kind = "cpu"

    def __init__(self) -> None:
        super().__init__()
        self.layout = "cross_layer"
        self.cache: VirtualKVCache | None = None
        self.lengths: dict[int, int] = {}  # model: used slot -> live tokens
        self.marks: dict[int, float] = {}  # used slot -> value written at its last live token

    @rule(
        layout=st.sampled_from(["cross_layer", "cross_layer_kv", "per_layer"]),
        budget_rows=st.integers(0, 24),
        batch=st.integers(1, 4),
        ahead=st.integers(0, 3),
    )
    @precondition(lambda self: self.cache is None)
    def create(self, layout: str, budget_rows: int, batch: int, ahead: int) -> None:
        spec = make_spec(self.kind, layout, max_slots=5, max_seq_len=400)
        page = CPU_PAGE if self.kind == "cpu" else 2 << 20
        probe_bytes = 2 * (spec.num_layers if layout == "per_layer" else 1) * page
        self.cache = VirtualKVCache(
            spec,
            self.kind,
            budget_bytes=budget_rows * probe_bytes,
            pool_batch=batch,
            lookahead_tokens=ahead * 64,
        )

    def _mark(self, slot: int, n: int) -> None:
        assert self.cache is not None
        if n == 0:
            self.marks.pop(slot, None)
            return
        value = float(slot * 400 + n)  # exact in fp16 too (<= 2048)
        self.cache.k_cache(self.cache.spec.num_layers - 1)[slot, n - 1, 0, 0] = value
        self.cache.v_cache(0)[slot, n - 1, -1, -1] = -value
        self.marks[slot] = value

    def _attempt(self, action, targets: dict[int, int]) -> None:  # type: ignore[no-untyped-def]
        assert self.cache is not None
        before = _snapshot(self.cache)
        try:
            action()
        except OutOfKVMemory:
            assert _snapshot(self.cache) == before
            return
        for s, n in targets.items():
            self.lengths[s] = n
            self._mark(s, n)

    @rule()
    @precondition(lambda self: self.cache is not None)
    def alloc(self) -> None:
        assert self.cache is not None
        try:
            s = self.cache.alloc_slot()
        except OutOfKVMemory:
            assert len(self.lengths) == self.cache.spec.max_slots
            return
        assert s not in self.lengths
        self.lengths[s] = 0

    @rule(data=st.data())
    @precondition(lambda self: self.cache is not None and self.lengths)
    def free(self, data: st.DataObject) -> None:
        assert self.cache is not None
        s = data.draw(st.sampled_from(sorted(self.lengths)))
        self.cache.free_slot(s)
        del self.lengths[s]
        self.marks.pop(s, None)
        with pytest.raises(ValueError):
            self.cache.free_slot(s)

    @rule(data=st.data(), n=st.integers(0, 400))
    @precondition(lambda self: self.cache is not None and self.lengths)
    def ensure(self, data: st.DataObject, n: int) -> None:
        assert self.cache is not None
        s = data.draw(st.sampled_from(sorted(self.lengths)))
        cache = self.cache
        self._attempt(lambda: cache.ensure(s, n), {s: n})

    @rule(data=st.data(), use_async=st.booleans())
    @precondition(lambda self: self.cache is not None and self.lengths)
    def step(self, data: st.DataObject, use_async: bool) -> None:
        assert self.cache is not None
        cache = self.cache
        targets = {s: data.draw(st.integers(0, 400)) for s in sorted(self.lengths)}

        def run() -> None:
            if use_async:
                cache.step_async(targets)
                cache.wait()
            else:
                cache.step(targets)

        self._attempt(run, targets)

    @rule()
    @precondition(lambda self: self.cache is not None)
    def trim(self) -> None:
        assert self.cache is not None
        self.cache.trim()
        st_ = self.cache.stats()
        assert st_.pool_free_bytes == 0 and st_.reclaimable_bytes == 0

    @invariant()
    def accounting_matches_model(self) -> None:
        cache = self.cache
        if cache is None:
            return
        cache.check_integrity()
        stats = cache.stats()
        assert stats.slots_used == len(self.lengths)
        for s, n in self.lengths.items():
            assert cache.length(s) == n
            assert cache.mapped_pages(s) >= cache.layout.pages_for(n)
        live = (
            sum(self.lengths.values()) * cache.layout.buffer_token_bytes * cache.layout.num_buffers
        )
        assert stats.live_bytes == live
        assert stats.created_bytes == stats.mapped_bytes + stats.pool_free_bytes
        assert stats.created_bytes <= stats.budget_bytes
        for s, value in self.marks.items():
            n = self.lengths[s]
            assert cache.k_cache(cache.spec.num_layers - 1)[s, n - 1, 0, 0].item() == value
            assert cache.v_cache(0)[s, n - 1, -1, -1].item() == -value

    def teardown(self) -> None:
        if self.cache is not None:
            self.cache.close()
            assert self.cache.closed


SETTINGS = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CacheMachine.TestCase.settings = SETTINGS
TestVirtualKVCacheStateful = CacheMachine.TestCase


class CudaCacheMachine(CacheMachine):
    kind = "cuda"


CudaCacheMachine.TestCase.settings = settings(SETTINGS, max_examples=40)
TestVirtualKVCacheStatefulCuda = pytest.mark.gpu(CudaCacheMachine.TestCase)
