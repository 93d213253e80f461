"""The state `VirtualKVCache` keeps, declared once for the mixins that make it up
(`segments.PrefixSegments`, `sharing.PrefixSharing`, `accounting.CacheAccounting`): what each
attribute holds is documented where `virtual.VirtualKVCache.__init__` sets it. The methods
declared here are defined by the cache or another mixin; the stubs only name them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from vattention.kvcache.layout import CacheLayout
from vattention.kvcache.pool import PagePool
from vattention.kvcache.prefix import PrefixTable
from vattention.kvcache.spec import KVCacheSpec
from vattention.memory.backend import MemoryBackend

if TYPE_CHECKING:
    from vattention.kvcache.segments import Segment


class CacheState:
    """Attributes and cross-mixin methods of `VirtualKVCache` (no behaviour of its own)."""

    spec: KVCacheSpec
    layout: CacheLayout
    page_size: int
    segment_min_pages: int
    _backend: MemoryBackend
    _owns_backend: bool
    _base: int
    _raw: torch.Tensor
    _lock: threading.RLock
    _pool: PagePool
    _pages: list[list[list[int]]]  # slot -> page -> one handle per buffer
    _lengths: list[int]
    _cap_tokens: list[int]
    _used: list[bool]
    _prepared: list[bool]
    _epoch: list[int]
    _freed_at: list[object]
    _freed_seq: list[int]
    _tenure: list[int]
    _publish_stopped: dict[int, int]
    _table: PrefixTable
    _refs: dict[int, int]
    _idle_table_handles: int
    _segments: dict[int, Segment]  # first row id -> segment
    _seg_ids: dict[int, tuple[Segment, int]]  # row id -> (segment, row index)
    _next_row_id: int
    _segments_built: int
    _segments_split: int
    _map_calls: int
    _unmap_calls: int
    _access_calls: int
    _blocking_map_calls: int

    def _check_slot(self, slot: int) -> None:
        raise NotImplementedError  # VirtualKVCache

    def _free_mapped(self) -> int:
        raise NotImplementedError  # VirtualKVCache

    def _unmap_tail(self, slot: int, count: int) -> int:
        raise NotImplementedError  # VirtualKVCache

    def _release(self, handle: int) -> bool:
        raise NotImplementedError  # PrefixSharing

    def _acquire(self, handle: int) -> None:
        raise NotImplementedError  # PrefixSharing

    def _wait_freed(self, slot: int) -> None:
        raise NotImplementedError  # PrefixSharing

    def _shared_in_used(self, used: list[int]) -> int:
        raise NotImplementedError  # PrefixSharing
