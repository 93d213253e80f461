"""`PagedKVCache`: the PagedAttention baseline (what vLLM does), with the same slot API as
`VirtualKVCache` so the engine and the benchmarks can swap one for the other.

Per layer, K and V are block pools `[num_blocks, block_size, kv_heads, head_dim]` allocated up
front from the budget; a request's tokens live in the blocks its block table lists, in order.
Kernels must follow the table (`paged_*` attention backends).

Invariants (checked by `check_integrity`): block 0 is never handed out (padding rows of block
tables and CUDA graphs point at it); every other block is either free or in exactly one slot's
table; a used slot's table covers its length (`len(table) * block_size >= length`); `ensure` /
`step` are all-or-nothing (`OutOfKVMemory` changes nothing); freeing a slot returns its blocks
at once (vLLM frees eagerly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from vattention.kvcache.spec import KVCacheSpec
from vattention.memory.errors import OutOfKVMemory


@dataclass(frozen=True)
class PagedStats:
    block_size: int
    num_blocks: int  # usable blocks (block 0, the padding block, excluded)
    free_blocks: int
    used_blocks: int
    live_tokens: int
    allocated_bytes: int  # the whole pool, reserved up front
    live_bytes: int
    slots_used: int

    @property
    def internal_fragmentation(self) -> float:
        held = self.used_blocks * self.block_size
        return 0.0 if held == 0 else 1.0 - self.live_tokens / held

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = dict(asdict(self))
        d["internal_fragmentation"] = self.internal_fragmentation
        return d


class PagedKVCache:
    """Block-table KV cache with a free-list block allocator."""

    def __init__(
        self,
        spec: KVCacheSpec,
        block_size: int = 16,
        *,
        num_blocks: int | None = None,
        budget_bytes: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(spec, KVCacheSpec):
            raise TypeError(f"spec must be a KVCacheSpec, got {type(spec).__name__}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if (num_blocks is None) == (budget_bytes is None):
            raise ValueError("give exactly one of num_blocks and budget_bytes")
        self.spec = spec
        self.block_size = block_size
        self.device = torch.device(device)
        self.block_bytes = block_size * spec.token_bytes
        per_slot = -(-spec.max_seq_len // block_size)
        if num_blocks is None:
            assert budget_bytes is not None
            num_blocks = min(budget_bytes // self.block_bytes, spec.max_slots * per_slot) + 1
        if num_blocks < 2:
            raise ValueError(f"need at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        shape = (spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self._k = torch.empty(shape, dtype=spec.dtype, device=self.device)
        self._v = torch.empty(shape, dtype=spec.dtype, device=self.device)
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low blocks first
        self._tables: list[list[int]] = [[] for _ in range(spec.max_slots)]
        self._lengths = [0] * spec.max_slots
        self._used = [False] * spec.max_slots
        self._closed = False
        self._error: OutOfKVMemory | None = None

    # -- tensors ----------------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        """K pool of `layer`: `[num_blocks, block_size, kv_heads, head_dim]`."""
        self._check_layer(layer)
        return self._k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._v[layer]

    # -- slots ------------------------------------------------------------------------------
    def alloc_slot(self) -> int:
        self._check_open()
        for s, used in enumerate(self._used):
            if not used:
                self._used[s] = True
                self._lengths[s] = 0
                return s
        raise OutOfKVMemory(f"no free slot: all {self.spec.max_slots} slots are in use")

    def free_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self._free.extend(reversed(self._tables[slot]))
        self._tables[slot] = []
        self._lengths[slot] = 0
        self._used[slot] = False

    @property
    def num_free_slots(self) -> int:
        return self._used.count(False)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def block_table(self, slot: int) -> list[int]:
        return list(self._tables[slot])

    def block_tables(self, slots: Sequence[int]) -> list[list[int]]:
        return [self._tables[s] for s in slots]

    # -- backing ----------------------------------------------------------------------------
    def ensure(self, slot: int, num_tokens: int) -> None:
        self.step({slot: num_tokens})

    def step(self, lengths: Mapping[int, int]) -> None:
        """Give every slot in `lengths` blocks for that many tokens; all-or-nothing."""
        if not isinstance(lengths, Mapping):
            raise TypeError(f"lengths must be a mapping slot->tokens, got {type(lengths).__name__}")
        bs, top = self.block_size, self.spec.max_seq_len
        need = 0
        for s, n in lengths.items():
            self._check_slot(s)
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= top:
                raise ValueError(f"slot {s}: {n!r} tokens is outside [0, max_seq_len={top}]")
            need += max(0, -(-n // bs) - len(self._tables[s]))
        if need > len(self._free):
            raise OutOfKVMemory(
                f"paged KV cache out of memory: {need} blocks asked, {len(self._free)} free",
                pages_needed=need, pages_available=len(self._free),
            )  # fmt: skip
        for s, n in lengths.items():
            table = self._tables[s]
            for _ in range(-(-n // bs) - len(table)):
                table.append(self._free.pop())
            self._lengths[s] = n

    def step_async(self, lengths: Mapping[int, int], reserve: Sequence[int] = ()) -> None:
        """Same as `step` (block allocation is host bookkeeping: nothing to overlap);
        `reserve` is accepted for API parity and ignored (blocks are taken at admission)."""
        del reserve
        try:
            self.step(lengths)
        except OutOfKVMemory as e:
            self._error = e

    def wait(self, interrupt: bool = True) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    # -- accounting -------------------------------------------------------------------------
    def stats(self) -> PagedStats:
        used = [s for s in range(self.spec.max_slots) if self._used[s]]
        live = sum(self._lengths[s] for s in used)
        return PagedStats(
            block_size=self.block_size,
            num_blocks=self.num_blocks - 1,
            free_blocks=len(self._free),
            used_blocks=sum(len(self._tables[s]) for s in used),
            live_tokens=live,
            allocated_bytes=self.num_blocks * self.block_bytes,
            live_bytes=live * self.spec.token_bytes,
            slots_used=len(used),
        )

    def check_integrity(self) -> None:
        held = [b for t in self._tables for b in t]
        problems = []
        if 0 in held or 0 in self._free:
            problems.append("block 0 (padding) was handed out")
        if sorted(held + self._free) != list(range(1, self.num_blocks)):
            problems.append("a block is lost or held twice")
        for s in range(self.spec.max_slots):
            if len(self._tables[s]) * self.block_size < self._lengths[s]:
                problems.append(f"slot {s}: table shorter than its length")
            if not self._used[s] and (self._tables[s] or self._lengths[s]):
                problems.append(f"free slot {s} holds blocks")
        if problems:
            raise RuntimeError("paged KV cache integrity: " + "; ".join(problems))

    # -- checks and teardown ------------------------------------------------------------------
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

    def close(self) -> None:
        self._closed = True
        self._k = self._v = torch.empty(0)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> PagedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
