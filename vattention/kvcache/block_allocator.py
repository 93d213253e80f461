"""`BlockAllocator`: the free list of the paged KV cache (the PagedAttention baseline).

Blocks are numbered `[0, num_blocks)`; the first `reserved` of them are never handed out (block 0
is the padding block: padding rows of block tables and of CUDA graphs point at it).
Invariants (checked by `check`): every unreserved block is either free or held, never both and
never twice; `allocate` is all-or-nothing (`OutOfKVMemory` changes nothing); freeing a block
that is not held (double free, reserved, out of range) raises `ValueError` and changes nothing.
Blocks come out lowest-first from a fresh allocator and LIFO after frees (a just-freed block is
the next one reused, as vLLM's free queue does).
"""

from __future__ import annotations

from collections.abc import Iterable

from vattention.memory.errors import OutOfKVMemory


class BlockAllocator:
    """A stack of free block ids with an ownership bitmap for double-free detection."""

    def __init__(self, num_blocks: int, reserved: int = 1) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool):
            raise TypeError(f"num_blocks must be an int, got {type(num_blocks).__name__}")
        if not isinstance(reserved, int) or reserved < 0:
            raise ValueError(f"reserved must be an int >= 0, got {reserved!r}")
        if num_blocks <= reserved:
            raise ValueError(
                f"num_blocks ({num_blocks}) must exceed the {reserved} reserved block(s)"
            )
        self.num_blocks = num_blocks
        self.reserved = reserved
        self._free = list(range(num_blocks - 1, reserved - 1, -1))  # pop() gives the lowest
        self._held = bytearray(num_blocks)

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (all but the reserved ones)."""
        return self.num_blocks - self.reserved

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` free blocks, or `OutOfKVMemory` (and nothing taken) when fewer are free."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"block count must be an int >= 0, got {n!r}")
        if n > len(self._free):
            raise OutOfKVMemory(
                f"paged KV cache out of blocks: {n} blocks asked, {len(self._free)} free "
                f"of {self.capacity}",
                pages_needed=n,
                pages_available=len(self._free),
            )
        if n == 0:
            return []
        blocks = self._free[-n:]
        del self._free[-n:]
        blocks.reverse()
        for b in blocks:
            self._held[b] = 1
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Return held blocks; all are checked before any is returned."""
        blocks = list(blocks)
        seen: set[int] = set()
        for b in blocks:
            if not isinstance(b, int) or not self.reserved <= b < self.num_blocks:
                raise ValueError(
                    f"block {b!r} is not a block of this allocator "
                    f"[{self.reserved}, {self.num_blocks})"
                )
            if not self._held[b] or b in seen:
                raise ValueError(f"block {b} is not held (freed twice?)")
            seen.add(b)
        for b in reversed(blocks):
            self._held[b] = 0
            self._free.append(b)

    def is_held(self, block: int) -> bool:
        return 0 <= block < self.num_blocks and bool(self._held[block])

    def check(self) -> list[str]:
        """Invariant violations, as readable lines (empty when all is well)."""
        problems = []
        free = set(self._free)
        if len(free) != len(self._free):
            problems.append("a block is on the free list twice")
        if any(b < self.reserved or b >= self.num_blocks for b in free):
            problems.append("a reserved or out-of-range block is on the free list")
        held = {b for b in range(self.num_blocks) if self._held[b]}
        if held & free:
            problems.append(f"blocks both free and held: {sorted(held & free)[:8]}")
        if len(held) + len(free) != self.capacity:
            problems.append(
                f"{self.capacity - len(held) - len(free)} block(s) are neither free nor held"
            )
        return problems
