"""Errors of the memory library.

`OutOfKVMemory` is an expected condition (the scheduler preempts on it), not a crash: whoever
raises it must leave every mapping and every counter as it was before the call.
"""

from __future__ import annotations


class MemoryBackendError(RuntimeError):
    """A physical-memory backend call failed (names the call and the driver's error)."""


class NoCudaDriverError(MemoryBackendError):
    """The CUDA backend was asked for on a machine without an NVIDIA driver."""


class OutOfKVMemory(RuntimeError):
    """The KV-cache memory budget cannot back what was asked.

    Attributes say what was asked and what was free, in pages of the cache's page size.
    """

    def __init__(self, message: str, *, pages_needed: int = 0, pages_available: int = 0) -> None:
        super().__init__(message)
        self.pages_needed = pages_needed
        self.pages_available = pages_available
