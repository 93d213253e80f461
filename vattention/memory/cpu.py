"""CPU backend: the vAttention design on OS virtual memory (Linux).

- reserve: `mmap(PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)`: address space, no memory;
- pages: `page_size` slices of one `memfd_create` file (a handle of several pages is a run of
  them); creating commits the memory with `fallocate`, destroying punches the hole back (the
  memory really returns to the OS);
- map: `mmap(addr, MAP_SHARED|MAP_FIXED, memfd, offset)`: the handle's pages appear at `addr`;
- unmap: map fresh `PROT_NONE` anonymous memory over the page (the range stays reserved).

A memfd page mapped at two addresses aliases (both see the same bytes): the basis of prefix
sharing. Handles are the index of their first page in the memfd; freed indices are reused by
one-page handles. Invariant: the handles in `self._live` hold memory; the file never shrinks
below the highest live one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import torch

from vattention.memory.backend import MemoryBackend
from vattention.memory.errors import MemoryBackendError, OutOfKVMemory

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

DEFAULT_PAGE_SIZE = 2 << 20


def _mmap(
    addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int, call: str
) -> int:
    res = _libc.mmap(addr, length, prot, flags, fd, offset)
    if res is None or res == MAP_FAILED:
        err = ctypes.get_errno()
        raise MemoryBackendError(f"{call}: mmap failed: {os.strerror(err)} (errno {err})")
    return int(res)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class CpuBackend(MemoryBackend):
    """OS virtual memory: reserved `PROT_NONE` ranges and memfd pages mapped into them."""

    name = "cpu"

    def __init__(self, page_size: int | None = None) -> None:
        os_page = os.sysconf("SC_PAGE_SIZE")
        page_size = DEFAULT_PAGE_SIZE if page_size is None else page_size
        if page_size % os_page:
            raise ValueError(
                f"page_size {page_size} is not a multiple of the OS page size {os_page}"
            )
        super().__init__(page_size, torch.device("cpu"))
        if not hasattr(os, "memfd_create"):
            raise MemoryBackendError("the CPU backend needs Linux memfd_create")
        self._fd = os.memfd_create("vattention-kv", getattr(os, "MFD_CLOEXEC", 1))
        self._lock = threading.Lock()
        self._file_pages = 0
        self._free_indices: list[int] = []
        self._next_index = 0
        self._live: dict[int, int] = {}  # handle (first file page) -> its pages
        self._mapped: dict[int, tuple[int, int]] = {}  # addr -> (handle, pages)
        self._mappings: dict[int, int] = {}  # handle -> how many addresses map it
        self._covered: set[int] = set()  # every page address some mapping covers
        self._ranges: dict[int, int] = {}  # base -> nbytes

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the CPU memory backend is closed")

    def _check_aligned(self, value: int, what: str) -> None:
        if value % self.page_size:
            raise ValueError(
                f"{what} {value:#x} is not a multiple of the page size {self.page_size}"
            )

    def reserve(self, nbytes: int) -> int:
        self._check_open()
        self._check_aligned(nbytes, "reservation size")
        if nbytes <= 0:
            raise ValueError(f"reservation size must be positive, got {nbytes}")
        # Over-reserve by one page so the base can be aligned to the page size.
        raw = _mmap(
            None,
            nbytes + self.page_size,
            PROT_NONE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
            -1,
            0,
            "reserve",
        )
        base = (raw + self.page_size - 1) // self.page_size * self.page_size
        if base > raw:
            _libc.munmap(raw, base - raw)
        tail = raw + nbytes + self.page_size - (base + nbytes)
        if tail > 0:
            _libc.munmap(base + nbytes, tail)
        with self._lock:
            self._ranges[base] = nbytes
        return base

    def release_range(self, addr: int, nbytes: int) -> None:
        with self._lock:
            if self._ranges.get(addr) != nbytes:
                raise ValueError(f"no reserved range of {nbytes} bytes at {addr:#x}")
            if any(addr <= a < addr + nbytes for a in self._mapped):
                raise ValueError(f"range at {addr:#x} still has mapped pages")
            del self._ranges[addr]
        if _libc.munmap(addr, nbytes) != 0:
            raise MemoryBackendError(f"release_range: munmap failed (errno {ctypes.get_errno()})")

    def create_page(self, pages: int = 1) -> int:
        self._check_open()
        if pages < 1:
            raise ValueError(f"pages must be >= 1, got {pages}")
        with self._lock:
            if pages == 1 and self._free_indices:
                idx = self._free_indices.pop()
            else:  # a new run of file pages (a segment's run is reused page by page later)
                idx = self._next_index
                self._next_index += pages
            if self._next_index > self._file_pages:
                self._file_pages = max(self._next_index, 2 * self._file_pages)
                os.ftruncate(self._fd, self._file_pages * self.page_size)
            try:
                os.posix_fallocate(self._fd, idx * self.page_size, pages * self.page_size)
            except OSError as e:
                self._free_indices.extend(range(idx, idx + pages))
                raise OutOfKVMemory(
                    f"cannot commit {pages} page(s) of {self.page_size} bytes: {e}"
                ) from e
            self._live[idx] = pages
        return idx

    def destroy_page(self, handle: int) -> None:
        with self._lock:
            if handle not in self._live:
                raise ValueError(f"page {handle} does not exist (destroyed twice?)")
            if self._mappings.get(handle):
                raise ValueError(f"page {handle} is still mapped")
            pages = self._live[handle]
            rc = _libc.fallocate(
                self._fd,
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                handle * self.page_size,
                pages * self.page_size,
            )
            if rc != 0:
                raise MemoryBackendError(
                    f"destroy_page: fallocate(PUNCH_HOLE) failed (errno {ctypes.get_errno()})"
                )
            del self._live[handle]
            self._free_indices.extend(range(handle, handle + pages))

    def _check_in_range(self, addr: int) -> None:
        self._check_aligned(addr, "address")
        if not any(b <= addr < b + n for b, n in self._ranges.items()):
            raise ValueError(f"address {addr:#x} is not inside a reserved range")

    def map(self, addr: int, handle: int) -> None:
        self._check_open()
        with self._lock:
            if handle not in self._live:
                raise ValueError(f"page {handle} does not exist")
            pages = self._live[handle]  # all of it, as CUDA's driver does
            self._check_in_range(addr)
            self._check_in_range(addr + (pages - 1) * self.page_size)
            span = [addr + i * self.page_size for i in range(pages)]
            if any(a in self._covered for a in span):
                raise ValueError(f"address {addr:#x} is already mapped")
            _mmap(
                addr,
                pages * self.page_size,
                PROT_READ | PROT_WRITE,
                MAP_SHARED | MAP_FIXED,
                self._fd,
                handle * self.page_size,
                "map",
            )
            self._mapped[addr] = (handle, pages)
            self._mappings[handle] = self._mappings.get(handle, 0) + 1
            self._covered.update(span)

    def unmap(self, addr: int) -> None:
        with self._lock:
            if addr not in self._mapped:
                raise ValueError(f"nothing is mapped at {addr:#x}")
            pages = self._mapped[addr][1]
            _mmap(
                addr,
                pages * self.page_size,
                PROT_NONE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                -1,
                0,
                "unmap",
            )
            handle = self._mapped.pop(addr)[0]
            if self._mappings[handle] == 1:
                del self._mappings[handle]
            else:
                self._mappings[handle] -= 1
            self._covered.difference_update(addr + i * self.page_size for i in range(pages))

    def set_access(self, addr: int, nbytes: int) -> None:
        # `map` already grants read/write on the CPU; only validate.
        self._check_aligned(addr, "address")
        self._check_aligned(nbytes, "length")

    def tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        self._check_open()
        buf = (ctypes.c_uint8 * nbytes).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)

    def free_memory(self) -> int:
        return _meminfo_available()

    @property
    def num_pages(self) -> int:
        return len(self._live)

    @property
    def num_mappings(self) -> int:
        return len(self._mapped)

    def close(self) -> None:
        if self.closed:
            return
        for addr in list(self._mapped):
            self.unmap(addr)
        for handle in list(self._live):
            self.destroy_page(handle)
        for base, n in list(self._ranges.items()):
            self.release_range(base, n)
        os.close(self._fd)
        self.closed = True
