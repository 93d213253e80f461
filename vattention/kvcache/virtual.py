"""`VirtualKVCache`: the vAttention allocator over a memory backend.

The whole worst case (max_slots x max_seq_len, every layer, K and V) is reserved as virtual
address space once; physical pages are mapped into it only as requests grow. Attention kernels
see ordinary dense tensors (`k_cache(layer)[slot, :length]`) whose addresses never move.

Invariants (checked by `check_integrity`, in `accounting.py` with `stats()`):
- a slot's mapped pages form a prefix: pages `[0, mapped(slot))` are mapped in every buffer, and
  a used slot's first `length(slot)` tokens lie inside them;
- every created page is in exactly one of: the pool (mapped nowhere, in no prefix row), mapped
  in slots, or held by the prefix table (`prefix.py`); only pages of prefix rows are mapped
  more than once (zero-copy sharing), and `created <= budget`;
- prefix rows hold whole, final tokens: a slot maps them only as its leading pages, and a used
  slot's length always covers every prefix row it maps (`alloc_slot` keeps only the rows its
  new request's cached prefix starts with, unmaps the rest before handing the slot out, and
  sets the length over the kept rows), so no request ever writes into a shared page;
  unmapping a freed slot's pages (prefix rows, or reclaiming them for others) first waits for
  the device work queued when it was freed (its event, recorded at every free); without a prefix,
  `alloc_slot` prefers slots that map no shared page, then the one freed first;
- `ensure` / `step` are all-or-nothing: on `OutOfKVMemory` no used slot's mapping or length
  changes (the check runs before anything is touched);
- a free slot keeps its pages (deferred reclamation); pages are taken back from free slots only
  when the pool and the budget cannot cover a request, or on `trim()`;
- every public method holds one re-entrant lock, so the background mapping thread of
  `step_async` and the caller never interleave.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vattention.kvcache.accounting import CacheAccounting
from vattention.kvcache.layout import CacheLayout
from vattention.kvcache.pool import PagePool
from vattention.kvcache.prefix import PrefixTable
from vattention.kvcache.segments import Segment
from vattention.kvcache.sharing import PrefixSharing
from vattention.kvcache.spec import KVCacheSpec, Lengths, normalize_lengths
from vattention.memory.backend import MemoryBackend, make_backend
from vattention.memory.errors import OutOfKVMemory

# Where `step_async` maps: "thread" (a background thread, joined by `wait()`), or "inline" (on
# the caller's thread at once, eager work capped at `inline_eager_pieces` pieces a call: meant
# to be called right after a step's launch, so it runs while the GPU works without competing
# with the launching thread for the interpreter).
MAPPING_MODES = ("thread", "inline")

# A hot cached prefix of at least this many pages is copied into one allocation per buffer (a
# segment) and mapped into later slots in one call per buffer (`segments.py`): on the H200 a
# mapping costs ~35 us whatever its size, so 128 pages cost ~9 ms a buffer page by page and
# ~35 us as a segment.
SEGMENT_MIN_PAGES = 4


class VirtualKVCache(PrefixSharing, CacheAccounting):
    """A KV cache contiguous in virtual memory, backed on demand by physical pages (prefix
    sharing: `sharing.PrefixSharing`)."""

    def __init__(
        self,
        spec: KVCacheSpec,
        backend: str | MemoryBackend = "cpu",
        *,
        device: str | torch.device | None = None,
        budget_bytes: int | None = None,
        budget_fraction: float | None = None,
        pool_batch: int = 8,
        lookahead_tokens: int = 128,
        lookahead_trigger_tokens: int | None = None,
        eager_map_calls: int = 8,
        mapping: str = "thread",
        inline_eager_pieces: int = 16,
        segment_min_pages: int | None = None,
    ) -> None:
        if not isinstance(spec, KVCacheSpec):
            raise TypeError(f"spec must be a KVCacheSpec, got {type(spec).__name__}")
        if budget_bytes is not None and budget_fraction is not None:
            raise ValueError("give budget_bytes or budget_fraction, not both")
        if budget_fraction is not None and not 0.0 < budget_fraction <= 1.0:
            raise ValueError(f"budget_fraction must be in (0, 1], got {budget_fraction}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if lookahead_tokens < 0:
            raise ValueError(f"lookahead_tokens must be >= 0, got {lookahead_tokens}")
        self.spec = spec
        self._owns_backend = not isinstance(backend, MemoryBackend)
        self._backend = make_backend(backend, spec.page_size, device)
        self.layout = CacheLayout(spec, self._backend.page_size)
        self.page_size = self._backend.page_size
        self.device = self._backend.device
        self.lookahead_tokens = lookahead_tokens
        trigger = lookahead_tokens if lookahead_trigger_tokens is None else lookahead_trigger_tokens
        if not 0 <= trigger <= lookahead_tokens:
            raise ValueError(
                f"lookahead_trigger_tokens must be in [0, lookahead_tokens={lookahead_tokens}], "
                f"got {trigger}"
            )
        self.lookahead_trigger_tokens = trigger
        if eager_map_calls < 1:
            raise ValueError(f"eager_map_calls must be >= 1, got {eager_map_calls}")
        self.eager_map_calls = eager_map_calls
        if mapping not in MAPPING_MODES:
            raise ValueError(f"mapping must be one of {MAPPING_MODES}, got {mapping!r}")
        if inline_eager_pieces < 1:
            raise ValueError(f"inline_eager_pieces must be >= 1, got {inline_eager_pieces}")
        self.mapping = mapping
        self.inline_eager_pieces = inline_eager_pieces
        if segment_min_pages is None:
            segment_min_pages = SEGMENT_MIN_PAGES
        if segment_min_pages < 0:
            raise ValueError(f"segment_min_pages must be >= 0, got {segment_min_pages}")
        # hot prefixes of at least this many pages are copied into one allocation per buffer
        # and mapped in one call (`segments.py`); 0: never
        self.segment_min_pages = segment_min_pages
        self._inline_error: OutOfKVMemory | None = None
        nbuf = self.layout.num_buffers
        max_pages = self.layout.pages_per_slot * spec.max_slots * nbuf
        if budget_bytes is None:
            fraction = 0.9 if budget_fraction is None else budget_fraction
            budget_bytes = int(self._backend.free_memory() * fraction)
        self._pool = PagePool(
            self._backend, min(max_pages, budget_bytes // self.page_size), pool_batch
        )
        self._lock = threading.RLock()
        self._closed = False
        self._base = self._backend.reserve(self.layout.total_bytes)
        try:
            self._raw = self._backend.tensor(self._base, self.layout.total_bytes)
            self._k, self._v = self.layout.views(self._raw)
        except BaseException:
            self._backend.release_range(self._base, self.layout.total_bytes)
            raise
        n = spec.max_slots
        self._pages: list[list[list[int]]] = [[] for _ in range(n)]  # slot -> page -> buffers
        self._lengths = [0] * n
        self._cap_tokens = [0] * n  # tokens the mapped pages of each slot can hold
        self._used = [False] * n
        self._prepared = [False] * n  # a free slot mapped ahead for an upcoming request
        # bumped at every alloc and free: a background job's plan for a slot applies only to
        # the tenure it was made for (a slot freed and handed out again is someone else's)
        self._tenure = [0] * n
        # bumped whenever the caller sets a slot's length (alloc, free, step, map_cached): the
        # background job's predicted length applies only if nobody set one since it was asked
        self._epoch = [0] * n
        self._table = PrefixTable()  # prefix rows: physical pages kept by key for sharing
        self._refs: dict[int, int] = {}  # handle -> slots mapping it
        self._idle_table_handles = 0  # prefix-row handles mapped nowhere (evictable)
        self._segments: dict[int, Segment] = {}  # first row id -> segment (segments.py)
        self._seg_ids: dict[int, tuple[Segment, int]] = {}  # row id -> (segment, row index)
        self._next_row_id = -1  # segment row ids count down from here, never reused
        self._segments_built = self._segments_split = 0
        self._freed_at: list[object] = [None] * n  # device work queued when a slot was freed
        self._freed_seq = [0] * n  # order in which slots were freed
        # slot -> its tenure when `cache_pages` met a key cached under another row: the slot
        # publishes nothing more until it is handed out again (shared rows lead its pages)
        self._publish_stopped: dict[int, int] = {}
        self._frees = 0
        self._map_calls = self._unmap_calls = self._access_calls = self._blocking_map_calls = 0
        self._executor: ThreadPoolExecutor | None = None
        self._interrupt = threading.Event()
        self._pending: Future[None] | None = None

    # -- tensors ----------------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        """K of `layer`: `[max_slots, max_seq_len, kv_heads, head_dim]`, a view that never moves."""
        self._check_layer(layer)
        return self._k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._v[layer]

    # -- slots ------------------------------------------------------------------------------
    def alloc_slot(self, prefix: Sequence[Hashable] = (), tokens: int | None = None) -> int:
        """A free slot. With `prefix` (page keys, all cached: see `cached_prefix`), the slot
        maps those prefix rows as its first pages and its length is the tokens they hold (as
        `map_cached`); the free slot already mapping most of them is chosen, so a request
        behind a shared system prompt usually maps nothing new.

        Otherwise one that maps no prefix row if there is one (such a slot is unmapped first,
        once the work queued before its free is done): with `tokens` (the request's size now),
        the one with the fewest pages that still cover them and the look-ahead, so a short
        request does not hold a long one's leftover pages; else (or if none covers them) the
        one with the most pages still mapped."""
        with self._lock:
            self._check_open()
            free = [s for s in range(self.spec.max_slots) if not self._used[s]]
            if not free:
                raise OutOfKVMemory(f"no free slot: all {self.spec.max_slots} slots are in use")
            keep = 0  # leading pages of the slot that already map the wanted prefix rows
            rows = self._cached_rows(prefix, "alloc_slot: not every prefix key") if prefix else []
            rows = self._whole_rows(rows)  # a segment they end inside is split first
            if rows:
                slot, keep = self._best_prefix_slot(free, rows)
            else:
                plain = [s for s in free if not self._shares(s)]
                want = self._pages_wanted(tokens)
                fits = [s for s in plain if len(self._pages[s]) >= want] if want else []
                if fits:  # best fit: no page to map, the fewest left over
                    slot = min(fits, key=lambda s: (len(self._pages[s]), s))
                elif plain:
                    slot = max(plain, key=lambda s: (len(self._pages[s]), -s))
                else:  # every free slot maps shared pages: the one freed first (work done)
                    slot = min(free, key=lambda s: self._freed_seq[s])
            if self._shared_lead(slot) > keep:
                # shared rows the request would write into go (with every page after them:
                # no holes); queued work may still read them, so wait for it alone first.
                # Private pages right after the kept rows stay: the request writes them anew.
                self._wait_freed(slot)
                self._unmap_tail(slot, len(self._pages[slot]) - keep)
            self._used[slot] = True
            self._tenure[slot] += 1
            self._epoch[slot] += 1
            self._prepared[slot] = False
            self._lengths[slot] = 0
            if rows:
                try:
                    self._map_rows(slot, rows)
                except BaseException:
                    self._used[slot] = False
                    raise
            return slot

    def _pages_wanted(self, tokens: int | None) -> int:
        """Pages (per buffer) a new request of `tokens` tokens is backed with at first; 0 for
        no hint."""
        if tokens is None or tokens <= 0:
            return 0
        return self.layout.pages_for(min(tokens + self.lookahead_tokens, self.spec.max_seq_len))

    def _best_prefix_slot(self, free: list[int], rows: list[tuple[int, ...]]) -> tuple[int, int]:
        """(slot, leading pages that already map `rows`) for a request that maps `rows`: the
        free slot matching most of them (the first full match ends the search), else the one
        with the fewest pages mapped where the rows go (each would be unmapped first)."""
        best, best_key = free[0], (-1, 0)
        for s in free:
            pages = self._pages[s]
            m = self._piece_floor(s, self._matching(s, rows))  # a segment is unmapped whole
            if m == len(rows):
                return s, m
            key = (m, -min(len(pages), len(rows)))
            if key > best_key:
                best, best_key = s, key
        return best, best_key[0]

    def free_slot(self, slot: int) -> None:
        """Give a slot back; its pages stay mapped for the next request (deferred reclamation)."""
        with self._lock:
            self._check_slot(slot)
            self._used[slot] = False
            self._tenure[slot] += 1
            self._epoch[slot] += 1
            self._lengths[slot] = 0
            # unmapping a freed slot's pages (reclaim, prefix rows) waits for this event alone,
            # not for the whole device (a few microseconds per request)
            self._freed_at[slot] = self._backend.record_event()
            self._frees += 1
            self._freed_seq[slot] = self._frees

    @property
    def num_free_slots(self) -> int:
        return self._used.count(False)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def mapped_pages(self, slot: int) -> int:
        """Pages mapped per buffer for `slot`."""
        return len(self._pages[slot])

    # -- backing ----------------------------------------------------------------------------
    def ensure(self, slot: int, num_tokens: int) -> None:
        """Back tokens `[0, num_tokens)` of `slot` in every layer, or raise `OutOfKVMemory`."""
        self.step({slot: num_tokens})

    def step(self, lengths: Lengths) -> None:
        """Batched `ensure` for every slot in `lengths`; all-or-nothing."""
        targets = self._normalize(lengths)
        with self._lock:
            before = self._map_calls
            self._back(self._growth(targets), targets)
            self._blocking_map_calls += self._map_calls - before
            for s, n in targets.items():
                self._lengths[s] = n
                self._epoch[s] += 1

    def step_async(self, lengths: Lengths, reserve: Sequence[int] = ()) -> None:
        """Start `step(lengths)` on the background thread; `wait()` joins.

        After backing what `lengths` asks, the same job maps ahead (eager allocation) until it
        runs out of work or `wait()` interrupts it. Look-ahead: once some used slot has fewer
        than `lookahead_trigger_tokens` (default: `lookahead_tokens`, i.e. every step) backed
        beyond its length, every used slot is backed `lookahead_tokens` beyond its length, least
        spare first. (A lower trigger maps in rarer, larger bursts; measured on the H200 it
        costs more step time than small pieces every step.) Then free slots are prepared for
        the requests expected next (`reserve`: their token counts, largest-mapped free slot
        first, the order `alloc_slot` hands them out); then the pool is topped up. Eager work
        uses only the pool and the budget (never reclaims), in pieces of at most
        `eager_map_calls` map calls, so an interruption costs at most one piece; each piece
        re-checks under the lock that its slot is still used (or, for `reserve`, still free),
        so the caller may keep using the cache (alloc, free, step) while the job runs.
        Arguments are checked here, in the caller; `OutOfKVMemory` (from the required part
        only) surfaces from `wait()`."""
        targets = self._normalize(lengths)
        top = self.spec.max_seq_len
        upcoming = [min(int(n), top) for n in reserve if int(n) > 0]
        self.wait()
        epoch = {s: self._epoch[s] for s in targets}
        if self.mapping == "inline":  # on the caller's thread, now (see `mapping`)
            try:
                self._step_and_look_ahead(targets, epoch, upcoming, self.inline_eager_pieces)
            except OutOfKVMemory as err:
                self._inline_error = err
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="vattention-map")
        self._pending = self._executor.submit(self._step_and_look_ahead, targets, epoch, upcoming)

    def wait(self, interrupt: bool = True) -> None:
        """Join the background job of `step_async` (re-raising its error, if any).

        With `interrupt` (the default) eager work still running stops after its current piece;
        the required part always completes."""
        error, self._inline_error = self._inline_error, None
        if error is not None:
            raise error
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if interrupt:
            self._interrupt.set()
        try:
            pending.result()
        finally:
            self._interrupt.clear()

    def can_fit(self, lengths: Lengths) -> bool:
        """Whether `step(lengths)` would succeed now (nothing is changed)."""
        targets = self._normalize(lengths)
        with self._lock:
            growth = self._growth(targets)
            need = self._pages_needed(growth)
            return need <= self._pool.obtainable + self._reclaimable() + self._trimmable(targets)

    def prefill_pool(self, num_pages: int) -> None:
        """Create up to `num_pages` free pages now (within the budget), off the critical path."""
        with self._lock:
            self._check_open()
            self._pool.refill(num_pages)

    def trim(self) -> int:
        """Unmap every free slot's pages and destroy every pooled page; returns bytes released."""
        self.wait()
        with self._lock:
            self._check_open()
            self._backend.synchronize()
            for s in range(self.spec.max_slots):
                if not self._used[s]:
                    self._unmap_tail(s, len(self._pages[s]))
            held = self._pool.held
            self._evict(None)
            return (self._pool.release_free() + held - self._pool.held) * self.page_size

    # -- internals --------------------------------------------------------------------------
    def _growth(self, targets: dict[int, int]) -> dict[int, int]:
        """Page counts for the slots whose pages do not yet cover their target length."""
        cap, pages_for = self._cap_tokens, self.layout.pages_for
        return {s: pages_for(n) for s, n in targets.items() if n > cap[s]}

    def _step_and_look_ahead(
        self,
        targets: dict[int, int],
        epoch: dict[int, int],
        reserve: list[int],
        max_pieces: int | None = None,
    ) -> None:
        with self._lock:
            # A slot whose length the caller set since `step_async` was called (freed, handed
            # out again, or stepped: the engine schedules the next step before joining this
            # job) is left alone: the caller's length is the newer one.
            targets = {s: n for s, n in targets.items() if self._epoch[s] == epoch[s]}
            self._back(self._growth(targets), targets)
            for s, n in targets.items():
                self._lengths[s] = n
        if not self._map_ahead(reserve, max_pieces):
            return
        while len(self._pool.free) < self._pool.batch and not self._interrupt.is_set():
            with self._lock:
                if self._closed or not self._pool.creatable:
                    return
                self._pool.refill(min(self._pool.batch, len(self._pool.free) + 4))

    def _map_ahead(self, reserve: list[int], max_pieces: int | None = None) -> bool:
        """Eager allocation in interruptible pieces (see `step_async`), at most `max_pieces`
        of them; False if it stopped before the end of its work."""
        pages_for, top = self.layout.pages_for, self.spec.max_seq_len
        with self._lock:
            # (spare tokens, slot, pages wanted, whether the slot is in use, its tenure)
            wanted: list[tuple[int, int, int, bool, int]] = []
            ten = self._tenure
            if self.lookahead_tokens:
                cap, lengths, look = self._cap_tokens, self._lengths, self.lookahead_tokens
                used = [s for s in range(self.spec.max_slots) if self._used[s]]
                low = self.lookahead_trigger_tokens
                if any(cap[s] < min(top, lengths[s] + low) for s in used):
                    for s in used:
                        horizon = min(top, lengths[s] + look)
                        if cap[s] < horizon:
                            wanted.append(
                                (cap[s] - lengths[s], s, pages_for(horizon), True, ten[s])
                            )
            wanted.sort()
            if reserve:
                free = [s for s in range(self.spec.max_slots) if not self._used[s]]
                free.sort(key=lambda s: (-len(self._pages[s]), s))  # alloc_slot's order
                wanted += [
                    (0, s, pages_for(n), False, ten[s]) for s, n in zip(free, reserve, strict=False)
                ]
        piece = max(1, self.eager_map_calls // self.layout.num_buffers)
        pieces = 0
        for _, s, want, in_use, tenure in wanted:
            while not self._interrupt.is_set():
                if max_pieces is not None and pieces >= max_pieces:
                    return False
                with self._lock:
                    if self._closed:
                        return False
                    if self._used[s] != in_use or self._tenure[s] != tenure:
                        break  # freed or handed out since the plan was made: not for it now
                    have = len(self._pages[s])
                    add = min(want - have, piece)
                    if add <= 0:
                        break
                    if add * self.layout.num_buffers > self._pool.obtainable:
                        return False
                    self._back({s: have + add})
                    if not in_use:
                        self._prepared[s] = True
                    pieces += 1
        return not self._interrupt.is_set()

    def _pages_needed(self, pages: dict[int, int]) -> int:
        extra = sum(max(0, p - len(self._pages[s])) for s, p in pages.items())
        return extra * self.layout.num_buffers

    def _free_mapped(self) -> int:
        """Page mappings (all buffers) of free slots (deferred reclamation)."""
        n = sum(len(self._pages[s]) for s in range(self.spec.max_slots) if not self._used[s])
        return n * self.layout.num_buffers

    def _reclaimable(self) -> int:
        """Pages reclaiming can put back in the pool: free slots' own pages (a shared page
        only once no slot maps it) and the prefix rows no slot maps (evicted last)."""
        n = self._idle_table_handles
        in_free: dict[int, int] = {}  # shared handle -> its mappings in free slots
        for s in range(self.spec.max_slots):
            if self._used[s] or not self._pages[s]:
                continue
            if not self._shares(s):
                n += len(self._pages[s]) * self.layout.num_buffers
            else:
                for row in self._pages[s]:
                    for h in row:
                        in_free[h] = in_free.get(h, 0) + 1
        # a page mapped only in free slots comes back once all of them are unmapped, however
        # many they are (counting only pages of refcount 1 missed those two free slots share)
        # (a segment's row ids count as its pages; retired segments no slot maps go too)
        n += self._reapable()
        return n + sum(c == self._refs[h] for h, c in in_free.items())

    def _spare(self, slot: int, targets: dict[int, int]) -> int:
        """Pages of a used slot beyond what its live tokens need: its current length, or the
        length `targets` (a step in progress) gives it, whichever is longer."""
        live = max(self._lengths[slot], targets.get(slot, 0))
        return len(self._pages[slot]) - self.layout.pages_for(live)

    def _trimmable(self, targets: dict[int, int]) -> int:
        """Look-ahead pages of used slots (see `_spare`): the first memory to give back when
        the pool runs short."""
        n = sum(
            max(0, self._spare(s, targets)) for s in range(self.spec.max_slots) if self._used[s]
        )
        return n * self.layout.num_buffers

    def _back(self, pages: dict[int, int], targets: dict[int, int] | None = None) -> None:
        """Map pages so each slot in `pages` has at least that many; all-or-nothing.

        With `targets` (the lengths the step sets), a short pool is topped up from free slots'
        pages, then from used slots' look-ahead (never from the pages of their live tokens, nor
        of the tokens `targets` gives them); without, only from the pool."""
        self._check_open()
        need = self._pages_needed(pages)
        if need == 0:
            return
        if len(self._pool.free) < need <= self._pool.obtainable:
            self._pool.refill(need)  # creation may hit device OOM, which lowers the budget
        if need > len(self._pool.free):  # only then count what else could be had (O(slots))
            reclaimable = 0
            if targets is not None:
                reclaimable = self._reclaimable() + self._trimmable(targets)
            if need > self._pool.obtainable + reclaimable:
                self._raise_oom(need, self._pool.obtainable + reclaimable)
            self._pool.refill(need)  # creation may hit device OOM, which lowers the budget
            if need > len(self._pool.free) + reclaimable:
                self._raise_oom(need, len(self._pool.free) + reclaimable)
            if targets is not None and need > len(self._pool.free):
                self._reclaim(need - len(self._pool.free), targets)
        handles = self._pool.take(need)
        done: list[tuple[int, int]] = []  # (slot, first new page) for rollback
        try:
            for slot, target in pages.items():
                start = len(self._pages[slot])
                if target <= start:
                    continue
                done.append((slot, start))
                self._map_range(slot, start, target, handles)
        except BaseException:
            for slot, start in done:
                self._unmap_tail(slot, len(self._pages[slot]) - start)
            self._pool.give(handles)
            raise

    def _map_range(self, slot: int, start: int, stop: int, handles: list[int]) -> None:
        nbuf, ps = self.layout.num_buffers, self.page_size
        for page in range(start, stop):
            row: list[int] = []
            self._pages[slot].append(row)
            for buf in range(nbuf):
                handle = handles.pop()
                self._backend.map(self._base + self.layout.page_offset(buf, slot, page), handle)
                self._refs[handle] = 1
                row.append(handle)
                self._map_calls += 1
        self._cap_tokens[slot] = stop * ps // self.layout.buffer_token_bytes
        for buf in range(nbuf):
            self._backend.set_access(
                self._base + self.layout.page_offset(buf, slot, start), (stop - start) * ps
            )
            self._access_calls += 1

    def _unmap_tail(self, slot: int, count: int) -> int:
        """Unmap the last `count` pages of `slot`; returns how many handles went back to the
        pool (a prefix row's pages stay with the table)."""
        pages = self._pages[slot]
        pooled = 0
        while count > 0 and pages:
            entry = self._seg_entry(pages[-1])
            if entry is not None:  # a segment piece ends here: it goes whole
                if count < len(entry[0].rows):
                    raise RuntimeError(f"slot {slot}: would unmap part of a prefix segment")
                count -= len(entry[0].rows)
                pooled += self._unmap_segment(slot, entry[0])
                continue
            count -= 1
            page = len(pages) - 1
            row = pages[-1]
            while row:
                buf = len(row) - 1
                self._backend.unmap(self._base + self.layout.page_offset(buf, slot, page))
                self._unmap_calls += 1
                pooled += self._release(row.pop())
            pages.pop()
        self._cap_tokens[slot] = len(pages) * self.page_size // self.layout.buffer_token_bytes
        return pooled

    def _reclaim(self, need: int, targets: dict[int, int]) -> None:
        """Take at least `need` pages back: from free slots first (leftovers before pages
        prepared for upcoming requests, smallest slots first), then from the look-ahead of used
        slots (largest look-ahead first), never below a slot's live tokens or its length in
        `targets` (see `_spare`)."""
        nbuf = self.layout.num_buffers
        free = [s for s in range(self.spec.max_slots) if not self._used[s] and self._pages[s]]
        # No device-wide sync: a free slot's pages may still be read by work queued before it
        # was freed, so each waits for its own free event (usually long done); a used slot's
        # look-ahead lies beyond every token queued work reads or writes (`_spare`).
        for s in sorted(free, key=lambda s: (self._prepared[s], len(self._pages[s]))):
            if need <= 0:
                return
            self._wait_freed(s)
            # a slot mapping prefix rows goes whole: they lead its pages
            count = len(self._pages[s]) if self._shares(s) else -(-need // nbuf)
            need -= self._unmap_tail(s, min(len(self._pages[s]), count))
        spare = {s: self._spare(s, targets) for s in range(self.spec.max_slots) if self._used[s]}
        for s in sorted(spare, key=lambda s: -spare[s]):
            if need <= 0:
                return
            count = min(spare[s], -(-need // nbuf))
            if count > 0:
                need -= self._unmap_tail(s, count)
        if need > 0:
            self._evict(need)

    def _raise_oom(self, need: int, available: int) -> None:
        raise OutOfKVMemory(
            f"KV cache out of memory: {need} pages of {self.page_size} bytes asked, "
            f"{available} free (budget {self._pool.budget} pages)",
            pages_needed=need,
            pages_available=available,
        )

    def _normalize(self, lengths: Lengths) -> dict[int, int]:
        self._check_open()
        return normalize_lengths(lengths, self.spec, self._used, self._check_slot)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the KV cache is closed")

    def _check_slot(self, slot: int) -> None:
        self._check_open()
        if (
            not isinstance(slot, int)
            or isinstance(slot, bool)
            or not 0 <= slot < self.spec.max_slots
        ):
            raise ValueError(f"slot {slot!r} is out of range [0, {self.spec.max_slots})")
        if not self._used[slot]:
            raise ValueError(f"slot {slot} is not allocated (freed twice, or never allocated?)")

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.spec.num_layers:
            raise ValueError(f"layer {layer} is out of range [0, {self.spec.num_layers})")

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Return every page and the virtual range; idempotent. Views must not be used after."""
        if self._closed:
            return
        with contextlib.suppress(OutOfKVMemory):
            self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._lock:
            self._backend.synchronize()
            for s in range(self.spec.max_slots):
                self._unmap_tail(s, len(self._pages[s]))
            self._evict(None)
            self._pool.release_free()
            self._k, self._v, self._raw = [], [], torch.empty(0, dtype=torch.uint8)
            self._backend.release_range(self._base, self.layout.total_bytes)
            if self._owns_backend:
                self._backend.close()
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> VirtualKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
