"""The paged baseline cache: block allocator, slot API, all-or-nothing growth, no leaked blocks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vattention import OutOfKVMemory
from vattention.kvcache.block_allocator import BlockAllocator
from vattention.kvcache.paged import PagedKVCache
from vattention.kvcache.spec import KVCacheSpec

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, max_slots=4, max_seq_len=100,
                   dtype=torch.float32)  # fmt: skip
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _state(cache: PagedKVCache) -> tuple[object, ...]:
    used = [s for s in range(SPEC.max_slots) if cache._used[s]]
    return (
        cache.stats(),
        tuple(cache.block_table(s) for s in used),
        tuple(cache.length(s) for s in used),
        cache.num_free_blocks,
    )


def test_allocator_hands_out_low_blocks_and_detects_double_free() -> None:
    alloc = BlockAllocator(6, reserved=1)
    assert alloc.capacity == 5 and alloc.num_free == 5
    a = alloc.allocate(2)
    assert a == [1, 2] and alloc.num_used == 2
    with pytest.raises(OutOfKVMemory) as err:
        alloc.allocate(4)
    assert err.value.pages_needed == 4 and err.value.pages_available == 3
    assert alloc.num_free == 3  # nothing taken
    alloc.free([2])
    with pytest.raises(ValueError, match="not held"):
        alloc.free([2])
    with pytest.raises(ValueError, match="not held"):
        alloc.free([1, 1])
    with pytest.raises(ValueError, match="not a block"):
        alloc.free([0])
    assert alloc.is_held(1) and alloc.num_free == 4  # the failed frees changed nothing
    assert alloc.allocate(1) == [2]  # LIFO reuse
    assert alloc.check() == []
    with pytest.raises(ValueError, match="must exceed"):
        BlockAllocator(1, reserved=1)


@pytest.mark.parametrize("device", DEVICES)
def test_tables_grow_by_blocks_and_free_returns_them(device: str) -> None:
    with PagedKVCache(SPEC, block_size=16, num_blocks=20, device=device) as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.ensure(a, 16)
        assert len(cache.block_table(a)) == 1
        cache.step({a: 33, b: 1})
        assert [len(cache.block_table(s)) for s in (a, b)] == [3, 1]
        assert 0 not in cache.block_table(a) + cache.block_table(b)
        cache.ensure(a, 5)  # shrinking keeps the blocks
        assert len(cache.block_table(a)) == 3 and cache.length(a) == 5
        st = cache.stats()
        assert (st.used_blocks, st.live_tokens, st.num_blocks, st.slots_used) == (4, 6, 19, 2)
        assert st.internal_fragmentation == pytest.approx(1 - 6 / 64)
        assert st.allocated_bytes == 20 * 16 * SPEC.token_bytes
        cache.free_slot(a)
        assert cache.num_free_blocks == 18
        cache.check_integrity()
        assert tuple(cache.k_cache(1).shape) == (20, 16, 2, 8)
        assert cache.k_cache(1).device.type == device
        assert torch.count_nonzero(cache.k_cache(0)[0]) == 0  # the padding block is zero
        # Every block starts zero-filled (finite): eager flex weights unread rows by zero.
        assert all(torch.count_nonzero(p) == 0 for p in (cache.k_cache(1), cache.v_cache(1)))


def test_out_of_blocks_changes_nothing_and_async_defers_the_error() -> None:
    with PagedKVCache(SPEC, block_size=16, num_blocks=5) as cache:  # 4 usable blocks
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.ensure(a, 40)
        before = _state(cache)
        with pytest.raises(OutOfKVMemory):
            cache.step({a: 48, b: 20})  # a fits alone, b does not: neither is applied
        assert _state(cache) == before
        assert not cache.can_fit({b: 20}) and cache.can_fit({b: 16})
        cache.step_async({b: 20})
        assert _state(cache) == before
        with pytest.raises(OutOfKVMemory):
            cache.wait()
        cache.wait()  # the error is raised once
        cache.step_async({b: 16}, [64, 10])  # the admission hint is accepted and ignored
        cache.wait(interrupt=True)
        assert cache.length(b) == 16 and cache.num_free_blocks == 0
        cache.check_integrity()


def test_bad_input_gets_clear_errors() -> None:
    with pytest.raises(ValueError, match="not both"):
        PagedKVCache(SPEC, num_blocks=4, budget_bytes=1 << 20)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(SPEC, block_size=0)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        PagedKVCache(SPEC, budget_bytes=10)
    with pytest.raises(TypeError, match="KVCacheSpec"):
        PagedKVCache("spec")  # type: ignore[arg-type]
    cache = PagedKVCache(SPEC, block_size=8)
    assert cache.num_blocks == 4 * 13 + 1  # full capacity plus the padding block
    s = cache.alloc_slot()
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.ensure(s, 101)
    with pytest.raises(ValueError, match="not allocated"):
        cache.ensure(3, 1)
    with pytest.raises(ValueError, match="out of range"):
        cache.free_slot(7)
    with pytest.raises(ValueError, match="layer"):
        cache.k_cache(2)
    with pytest.raises(TypeError, match="mapping"):
        cache.step(5)  # type: ignore[arg-type]
    cache.free_slot(s)
    with pytest.raises(ValueError, match="freed twice"):
        cache.free_slot(s)
    for _ in range(4):
        cache.alloc_slot()
    with pytest.raises(OutOfKVMemory, match="no free slot"):
        cache.alloc_slot()
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        cache.alloc_slot()


def test_budget_buys_whole_blocks_and_sequence_lengths_work() -> None:
    block_bytes = 16 * SPEC.token_bytes
    cache = PagedKVCache(SPEC, block_size=16, budget_bytes=3 * block_bytes + block_bytes // 2)
    assert cache.stats().num_blocks == 3
    a = cache.alloc_slot()
    cache.step([20, 0, 0, 0])  # one length per slot
    assert cache.length(a) == 20 and len(cache.block_table(a)) == 2
    with pytest.raises(ValueError, match="4 entries"):
        cache.step([1, 2])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from("afes"), st.integers(0, 3), st.integers(0, 100)),
                max_size=40))  # fmt: skip
def test_random_operations_keep_the_invariants(ops: list[tuple[str, int, int]]) -> None:
    """Random alloc/free/ensure/step: the tables cover each length, no block leaks, and every
    `OutOfKVMemory` leaves the state exactly as it was."""
    cache = PagedKVCache(SPEC, block_size=8, num_blocks=18)
    model: dict[int, int] = {}
    for op, slot, n in ops:
        before = _state(cache)
        try:
            if op == "a":
                model[cache.alloc_slot()] = 0
            elif op == "f" and slot in model:
                cache.free_slot(slot)
                del model[slot]
            elif op == "e" and slot in model:
                cache.ensure(slot, n)
                model[slot] = n
            elif op == "s" and model:
                targets = {s: min(100, model[s] + n) for s in model}
                cache.step(targets)
                model.update(targets)
        except OutOfKVMemory:
            assert _state(cache) == before
        cache.check_integrity()
        assert {s: cache.length(s) for s in model} == model
        assert cache.stats().slots_used == len(model)
    for s in list(model):
        cache.free_slot(s)
    assert cache.num_free_blocks == 17 and cache.num_free_slots == SPEC.max_slots
