"""The physical-memory backend interface: virtual ranges, physical pages, mappings.

A backend hands out three kinds of things and keeps no policy of its own:
- virtual ranges (`reserve` / `release_range`): address space only, no memory behind it;
- physical pages (`create_page` / `destroy_page`): opaque int handles of one page (`page_size`
  bytes) or of several (`create_page(pages)`: one physical allocation, a prefix segment);
- mappings (`map` / `unmap` / `set_access`): a whole handle at one page-aligned virtual address
  (the H200's driver refuses to map part of one: CUDA_ERROR_NOT_SUPPORTED). The driver's cost
  is per mapping, not per byte (H200: ~31 us to grant access to one mapping of 2 MiB or of
  256 MiB), so one mapping of a many-page handle replaces many page mappings.

Invariants every implementation keeps:
- `page_size` is a power of two and every address and length passed in is a multiple of it;
- a handle may be mapped at several addresses at once (aliasing: writes through one address are
  read through the others); it may be destroyed only once it is mapped nowhere;
- memory is readable and writable only after `map` then `set_access` over it (on the CPU the
  grant is part of `map`; `set_access` is then free);
- `close()` unmaps, destroys and releases everything still outstanding and is idempotent.
The allocator (`vattention.kvcache.virtual`) decides what to map where; backends only obey.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class MemoryBackend(ABC):
    """Physical memory on one device, mapped into reserved virtual ranges."""

    name: str = "base"

    def __init__(self, page_size: int, device: torch.device) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.page_size = page_size
        self.device = device
        self.closed = False

    # -- virtual ranges -------------------------------------------------------------------
    @abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve `nbytes` of virtual address space (no memory); returns its base address."""

    @abstractmethod
    def release_range(self, addr: int, nbytes: int) -> None:
        """Give back a reserved range; nothing may be mapped in it any more."""

    # -- physical pages -------------------------------------------------------------------
    @abstractmethod
    def create_page(self, pages: int = 1) -> int:
        """Create one physical allocation of `pages` pages; returns its handle. Raises
        `OutOfKVMemory` when the device has no memory left for it."""

    @abstractmethod
    def destroy_page(self, handle: int) -> None:
        """Return a handle's memory; it must be mapped nowhere."""

    # -- mappings -------------------------------------------------------------------------
    @abstractmethod
    def map(self, addr: int, handle: int) -> None:
        """Map all of `handle` at page-aligned `addr` inside a reserved range."""

    @abstractmethod
    def unmap(self, addr: int) -> None:
        """Unmap the mapping at `addr` (all of its handle); the handle survives."""

    @abstractmethod
    def set_access(self, addr: int, nbytes: int) -> None:
        """Grant read/write over `[addr, addr + nbytes)`, every page of which is mapped."""

    # -- views and facts ------------------------------------------------------------------
    @abstractmethod
    def tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 tensor over `[addr, addr + nbytes)` on `device`, without copying.

        Touching bytes of it that are not mapped is an error of the caller (a segfault on
        the CPU, an illegal-address fault on CUDA)."""

    @abstractmethod
    def free_memory(self) -> int:
        """Bytes of physical memory the device has free now."""

    def synchronize(self) -> None:  # noqa: B027 - a no-op where the device is the host
        """Wait until earlier device work is done (before unmapping what kernels may read)."""
        return None

    def record_event(self) -> Any:
        """A marker of the device work queued so far (None where the device is the host)."""
        return None

    def event_done(self, event: Any) -> bool:
        """Whether the work before `event` has finished (without waiting)."""
        return True

    def wait_event(self, event: Any) -> None:  # noqa: B027 - a no-op where the device is the host
        """Wait for the work before `event` only (later work may still run)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release every page, mapping and range still outstanding; idempotent."""

    def __enter__(self) -> MemoryBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_backend(
    kind: str | MemoryBackend,
    page_size: int | None = None,
    device: str | torch.device | None = None,
) -> MemoryBackend:
    """Build a backend by name: "cpu", "cuda" (or "cuda:N"), or pass one through."""
    if isinstance(kind, MemoryBackend):
        if page_size is not None and kind.page_size != page_size:
            raise ValueError(f"backend page size {kind.page_size} != requested {page_size}")
        return kind
    name = str(kind)
    if name == "cpu":
        from vattention.memory.cpu import CpuBackend

        return CpuBackend(page_size=page_size)
    if name == "cuda" or name.startswith("cuda:"):
        from vattention.memory.cuda import CudaBackend

        dev = torch.device(device if device is not None else name)
        return CudaBackend(device=dev, page_size=page_size)
    raise ValueError(f"unknown memory backend {kind!r}; use 'cpu' or 'cuda'")
