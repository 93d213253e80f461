"""The page pool: physical pages created ahead, recycled, and bounded by a hard budget.

Creating a page costs 60-300 us on the H200, so pages are created in batches before they are
needed and reused after unmapping instead of being destroyed.

Budget pages can also be *held* outside the pool (`hold`: prefix segments, one allocation of
many pages): they count against the budget but are not pool pages.

Invariants: `created == len(free) + pages handed out and not given back`;
`created + held <= budget`; every handle in `free` is mapped nowhere.
"""

from __future__ import annotations

from vattention.memory.backend import MemoryBackend
from vattention.memory.errors import OutOfKVMemory


class PagePool:
    def __init__(self, backend: MemoryBackend, budget_pages: int, batch: int = 8) -> None:
        if budget_pages < 0:
            raise ValueError(f"budget_pages must be >= 0, got {budget_pages}")
        if batch < 1:
            raise ValueError(f"pool batch must be >= 1, got {batch}")
        self.backend = backend
        self.budget = budget_pages
        self.batch = batch
        self.free: list[int] = []
        self.created = 0
        self.held = 0  # budget pages held outside the pool (see `hold`)
        self.create_calls = 0
        self.destroy_calls = 0

    @property
    def creatable(self) -> int:
        """Pages that can still be created within the budget."""
        return self.budget - self.created - self.held

    @property
    def obtainable(self) -> int:
        """Pages `take` can hand out without reclaiming anything."""
        return len(self.free) + self.creatable

    def _create(self, n: int) -> None:
        """Create up to `n` pages into `free`; device OOM lowers the budget to what exists."""
        for _ in range(min(n, self.creatable)):
            try:
                handle = self.backend.create_page()
            except OutOfKVMemory:
                self.budget = self.created + self.held
                return
            self.create_calls += 1
            self.created += 1
            self.free.append(handle)

    def take(self, n: int) -> list[int]:
        """Hand out `n` pages (creating missing ones in batches) or raise leaving pool as it was."""
        short = n - len(self.free)
        if short > 0:
            self._create(max(short, min(self.batch, self.creatable)))
        if n > len(self.free):
            raise OutOfKVMemory(
                f"page pool: {n} pages asked, {len(self.free)} obtainable "
                f"(budget {self.budget} pages, {self.created} created)",
                pages_needed=n,
                pages_available=len(self.free),
            )
        taken = self.free[-n:] if n else []
        del self.free[len(self.free) - n :]
        return taken

    def give(self, handles: list[int]) -> None:
        self.free.extend(handles)

    def refill(self, target: int) -> None:
        """Best effort: create pages until `target` are free (within the budget)."""
        if len(self.free) < target:
            self._create(target - len(self.free))

    def hold(self, n: int, keep: int = 0) -> bool:
        """Take `n` budget pages out of the pool for an allocation of its own, destroying free
        pages if the budget is all created, so that at least `keep` pages stay obtainable;
        False (nothing changed) if that cannot be done."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self.obtainable - n < keep:
            return False
        while self.creatable < n:
            self.backend.destroy_page(self.free.pop())
            self.destroy_calls += 1
            self.created -= 1
        self.held += n
        return True

    def unhold(self, n: int) -> None:
        """Give `n` held pages back to the budget (their allocation is gone)."""
        if not 0 <= n <= self.held:
            raise ValueError(f"cannot give back {n} of {self.held} held pages")
        self.held -= n

    def release_free(self) -> int:
        """Destroy every free page; returns how many."""
        n = len(self.free)
        while self.free:
            self.backend.destroy_page(self.free.pop())
            self.destroy_calls += 1
            self.created -= 1
        return n
