"""The paged baseline's block allocator: tables, all-or-nothing growth, no leaked blocks."""

from __future__ import annotations

import pytest
import torch

from vattention import OutOfKVMemory
from vattention.kvcache.block_cache import PagedKVCache
from vattention.kvcache.spec import KVCacheSpec

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, max_slots=4, max_seq_len=100,
                   dtype=torch.float32)  # fmt: skip


def test_tables_grow_and_free_returns_blocks() -> None:
    with PagedKVCache(SPEC, block_size=16, num_blocks=20) as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.ensure(a, 17)
        cache.step({a: 33, b: 1})
        assert len(cache.block_table(a)) == 3 and len(cache.block_table(b)) == 1
        assert 0 not in cache.block_table(a) + cache.block_table(b)
        assert cache.stats().used_blocks == 4 and cache.stats().live_tokens == 34
        cache.free_slot(a)
        assert cache.num_free_blocks == 19 - 1
        cache.check_integrity()
        assert tuple(cache.k_cache(1).shape) == (20, 16, 2, 8)


def test_out_of_blocks_changes_nothing() -> None:
    with PagedKVCache(SPEC, block_size=16, num_blocks=5) as cache:  # 4 usable blocks
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.ensure(a, 40)  # 3 blocks
        before = (cache.block_table(a), cache.block_table(b), cache.num_free_blocks)
        with pytest.raises(OutOfKVMemory, match="blocks asked"):
            cache.step({a: 48, b: 17})  # needs 2 more, 1 free
        assert (cache.block_table(a), cache.block_table(b), cache.num_free_blocks) == before
        cache.step_async({b: 17})
        with pytest.raises(OutOfKVMemory):
            cache.wait()
        cache.check_integrity()


def test_budget_sizes_the_pool_and_bad_input_is_rejected() -> None:
    block_bytes = 16 * SPEC.token_bytes
    with PagedKVCache(SPEC, block_size=16, budget_bytes=10 * block_bytes) as cache:
        assert cache.num_blocks == 11  # 10 usable + the padding block
        s = cache.alloc_slot()
        with pytest.raises(ValueError, match="max_seq_len"):
            cache.ensure(s, 101)
        with pytest.raises(ValueError, match="not allocated"):
            cache.ensure(s + 1, 1)
        cache.free_slot(s)
        with pytest.raises(ValueError, match="freed twice"):
            cache.free_slot(s)
        for _ in range(SPEC.max_slots):
            cache.alloc_slot()
        with pytest.raises(OutOfKVMemory, match="no free slot"):
            cache.alloc_slot()
    with pytest.raises(ValueError, match="exactly one"):
        PagedKVCache(SPEC, 16)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(SPEC, 0, num_blocks=4)
