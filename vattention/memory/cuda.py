"""CUDA backend: the CUDA driver's virtual-memory API through `cuda-bindings`.

- reserve: `cuMemAddressReserve` (virtual only, costs no device memory);
- pages: `cuMemCreate` of one granule (2 MiB on current NVIDIA drivers) of pinned device memory,
  or of several (a prefix segment: one allocation, so one mapping and one grant for all of it);
- map / unmap: `cuMemMap` / `cuMemUnmap` of a whole handle at one address (mapping part of one
  fails with CUDA_ERROR_NOT_SUPPORTED on the H200's driver 580);
- set_access: `cuMemSetAccess` over a whole contiguous mapped range in one call; its cost is
  per mapping in the range (~31 us each on the H200, whatever its size), not per byte;
- tensors: a `__cuda_array_interface__` wrapper, so torch sees the range in place (no copy).

Every `CUresult` is checked; failures raise `MemoryBackendError` naming the call, and
`CUDA_ERROR_OUT_OF_MEMORY` from `cuMemCreate` raises `OutOfKVMemory`. The backend works in the
device's primary context (the one torch uses) and makes it current in whichever thread calls it,
so the background mapping thread of the KV cache can use it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from vattention.memory.backend import MemoryBackend
from vattention.memory.errors import MemoryBackendError, NoCudaDriverError, OutOfKVMemory


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - depends on the install
        raise NoCudaDriverError(
            "the CUDA backend needs the 'cuda-bindings' package (pip install cuda-bindings)"
        ) from e
    return driver


class _CaiWrapper:
    """Exposes a raw device range through the CUDA array interface (bytes)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


class CudaBackend(MemoryBackend):
    """Physical pages of one CUDA device mapped into reserved virtual ranges."""

    name = "cuda"

    def __init__(self, device: torch.device | str = "cuda", page_size: int | None = None) -> None:
        cu = _driver()
        self._cu = cu
        try:
            (err,) = cu.cuInit(0)
        except Exception as e:  # DynamicLibNotFoundError and friends: no driver installed
            raise NoCudaDriverError(
                f"no CUDA driver on this machine ({type(e).__name__}: {e})"
            ) from e
        self._check(err, "cuInit")
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"the CUDA backend needs a cuda device, got {dev}")
        if not torch.cuda.is_available():
            raise NoCudaDriverError("torch sees no CUDA device on this machine")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", index)
        torch.cuda.init()
        with torch.cuda.device(index):
            torch.empty(1, device=dev)  # make torch create the primary context
        self._cudev = self._call(cu.cuDeviceGet(index), "cuDeviceGet")
        self._ctx = self._call(cu.cuDevicePrimaryCtxRetain(self._cudev), "cuDevicePrimaryCtxRetain")
        self._tls = threading.local()
        self._make_current()

        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = index
        self._prop = prop
        gran = int(
            self._call(
                cu.cuMemGetAllocationGranularity(
                    prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
                "cuMemGetAllocationGranularity",
            )
        )
        page_size = gran if page_size is None else page_size
        if page_size % gran:
            raise ValueError(
                f"page_size {page_size} is not a multiple of the driver granularity {gran}"
            )
        super().__init__(page_size, dev)
        self.granularity = gran
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = index
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self._lock = threading.Lock()
        self._pages: dict[int, tuple[Any, int]] = {}  # int handle -> (driver handle, pages)
        self._mapped: dict[int, tuple[int, int]] = {}  # addr -> (handle, pages)
        self._mappings: dict[int, int] = {}  # handle -> how many addresses map it
        self._ranges: dict[int, int] = {}  # base -> nbytes

    # -- helpers --------------------------------------------------------------------------
    def _check(self, err: Any, call: str) -> None:
        if err != self._cu.CUresult.CUDA_SUCCESS:
            _, name = self._cu.cuGetErrorName(err)
            _, text = self._cu.cuGetErrorString(err)
            name = name.decode() if isinstance(name, bytes) else name
            text = text.decode() if isinstance(text, bytes) else text
            raise MemoryBackendError(f"{call} failed: {name} ({text})")

    def _call(self, result: tuple[Any, ...], call: str) -> Any:
        self._check(result[0], call)
        return result[1] if len(result) == 2 else result[1:]

    def _make_current(self) -> None:
        if getattr(self._tls, "ctx_set", False):
            return
        self._check(self._cu.cuCtxSetCurrent(self._ctx)[0], "cuCtxSetCurrent")
        self._tls.ctx_set = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the CUDA memory backend is closed")
        self._make_current()

    def _aligned(self, value: int, what: str) -> None:
        if value % self.page_size:
            raise ValueError(
                f"{what} {value:#x} is not a multiple of the page size {self.page_size}"
            )

    # -- virtual ranges -------------------------------------------------------------------
    def reserve(self, nbytes: int) -> int:
        self._check_open()
        self._aligned(nbytes, "reservation size")
        if nbytes <= 0:
            raise ValueError(f"reservation size must be positive, got {nbytes}")
        ptr = int(
            self._call(
                self._cu.cuMemAddressReserve(nbytes, self.page_size, 0, 0), "cuMemAddressReserve"
            )
        )
        with self._lock:
            self._ranges[ptr] = nbytes
        return ptr

    def release_range(self, addr: int, nbytes: int) -> None:
        self._make_current()
        with self._lock:
            if self._ranges.get(addr) != nbytes:
                raise ValueError(f"no reserved range of {nbytes} bytes at {addr:#x}")
            if any(addr <= a < addr + nbytes for a in self._mapped):
                raise ValueError(f"range at {addr:#x} still has mapped pages")
            del self._ranges[addr]
        self._check(self._cu.cuMemAddressFree(addr, nbytes)[0], "cuMemAddressFree")

    # -- physical pages -------------------------------------------------------------------
    def create_page(self, pages: int = 1) -> int:
        self._check_open()
        if pages < 1:
            raise ValueError(f"pages must be >= 1, got {pages}")
        size = pages * self.page_size
        err, handle = self._cu.cuMemCreate(size, self._prop, 0)
        if err == self._cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise OutOfKVMemory(
                f"cuMemCreate: the device has no memory left for {size} bytes ({pages} pages)"
            )
        self._check(err, "cuMemCreate")
        key = int(handle)
        with self._lock:
            self._pages[key] = (handle, pages)
        return key

    def destroy_page(self, handle: int) -> None:
        self._make_current()
        with self._lock:
            if handle not in self._pages:
                raise ValueError(f"page {handle:#x} does not exist (destroyed twice?)")
            if self._mappings.get(handle):
                raise ValueError(f"page {handle:#x} is still mapped")
            obj, _ = self._pages.pop(handle)
        self._check(self._cu.cuMemRelease(obj)[0], "cuMemRelease")

    # -- mappings -------------------------------------------------------------------------
    def map(self, addr: int, handle: int) -> None:
        self._check_open()
        self._aligned(addr, "address")
        with self._lock:
            entry = self._pages.get(handle)
            if entry is None:
                raise ValueError(f"page {handle:#x} does not exist")
            if addr in self._mapped:
                raise ValueError(f"address {addr:#x} is already mapped")
            obj, pages = entry  # all of it: this driver refuses part of a handle
            size = pages * self.page_size
            self._check(self._cu.cuMemMap(addr, size, 0, obj, 0)[0], "cuMemMap")
            self._mapped[addr] = (handle, pages)
            self._mappings[handle] = self._mappings.get(handle, 0) + 1

    def unmap(self, addr: int) -> None:
        self._make_current()
        with self._lock:
            if addr not in self._mapped:
                raise ValueError(f"nothing is mapped at {addr:#x}")
            pages = self._mapped[addr][1]
            self._check(self._cu.cuMemUnmap(addr, pages * self.page_size)[0], "cuMemUnmap")
            handle = self._mapped.pop(addr)[0]
            if self._mappings[handle] == 1:
                del self._mappings[handle]
            else:
                self._mappings[handle] -= 1

    def set_access(self, addr: int, nbytes: int) -> None:
        self._check_open()
        self._aligned(addr, "address")
        self._aligned(nbytes, "length")
        self._check(self._cu.cuMemSetAccess(addr, nbytes, self._access, 1)[0], "cuMemSetAccess")

    # -- views and facts ------------------------------------------------------------------
    def tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        self._check_open()
        with torch.cuda.device(self.device):
            try:
                return torch.as_tensor(_CaiWrapper(addr, nbytes), device=self.device)
            except RuntimeError:
                # torch asks the driver which device owns the pointer, which fails while
                # nothing is mapped there yet: map a scratch page for the moment of wrapping.
                page = self.create_page()
                try:
                    self.map(addr, page)
                    self.set_access(addr, self.page_size)
                    return torch.as_tensor(_CaiWrapper(addr, nbytes), device=self.device)
                finally:
                    if addr in self._mapped:
                        self.unmap(addr)
                    self.destroy_page(page)

    def free_memory(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def record_event(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def event_done(self, event: Any) -> bool:
        return event is None or bool(event.query())

    def wait_event(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    @property
    def num_pages(self) -> int:
        return len(self._pages)

    @property
    def num_mappings(self) -> int:
        return len(self._mapped)

    def close(self) -> None:
        if self.closed:
            return
        self._make_current()
        torch.cuda.synchronize(self.device)
        for addr in list(self._mapped):
            self.unmap(addr)
        for handle in list(self._pages):
            self.destroy_page(handle)
        for base, n in list(self._ranges.items()):
            self.release_range(base, n)
        self._check(self._cu.cuDevicePrimaryCtxRelease(self._cudev)[0], "cuDevicePrimaryCtxRelease")
        self.closed = True
