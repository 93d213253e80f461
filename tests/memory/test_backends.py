"""Physical-memory backends: mapping, aliasing, errors and leak-free teardown."""

from __future__ import annotations

import os

import pytest
import torch

from tests.kvcache.helpers import BACKENDS, make_spec
from vattention import VirtualKVCache
from vattention.memory.backend import MemoryBackend, make_backend
from vattention.memory.errors import MemoryBackendError, NoCudaDriverError


def _backend(kind: str) -> MemoryBackend:
    return make_backend(kind, page_size=64 * 1024 if kind == "cpu" else None)


@pytest.mark.parametrize("kind", BACKENDS)
def test_one_page_aliased_at_two_addresses(kind: str) -> None:
    with _backend(kind) as b:
        ps = b.page_size
        base = b.reserve(8 * ps)
        page = b.create_page()
        b.map(base, page)
        b.map(base + 5 * ps, page)
        b.set_access(base, ps)
        b.set_access(base + 5 * ps, ps)
        view = b.tensor(base, 8 * ps)
        first, second = view[:ps], view[5 * ps : 6 * ps]
        first.copy_(torch.arange(ps, dtype=torch.int64).remainder(251).to(torch.uint8).to(b.device))
        assert torch.equal(second.cpu(), first.cpu())
        second.fill_(9)  # write through the other address
        assert int(first.sum().item()) == 9 * ps
        b.synchronize()
        b.unmap(base)
        assert int(second.sum().item()) == 9 * ps  # still mapped at the second address
        b.unmap(base + 5 * ps)
        b.destroy_page(page)
        b.release_range(base, 8 * ps)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_many_page_handle_maps_whole_at_several_addresses(kind: str) -> None:
    """A prefix segment: one allocation of 3 pages mapped whole at two addresses, one grant
    over both mappings; writes through one read through the other; unmapped whole."""
    with _backend(kind) as b:
        ps = b.page_size
        base = b.reserve(8 * ps)
        seg = b.create_page(3)
        b.map(base, seg)
        b.map(base + 3 * ps, seg)
        with pytest.raises(ValueError, match="already mapped"):
            b.map(base + 2 * ps, b.create_page()) if kind == "cpu" else b.map(base, seg)
        b.set_access(base, 6 * ps)  # one call over both mappings
        view = b.tensor(base, 8 * ps)
        view[: 3 * ps].copy_(torch.arange(3 * ps, device=b.device).remainder(253).to(torch.uint8))
        assert torch.equal(view[3 * ps : 6 * ps].cpu(), view[: 3 * ps].cpu())
        b.synchronize()
        b.unmap(base + 3 * ps)
        with pytest.raises(ValueError, match="still mapped"):
            b.destroy_page(seg)
        b.unmap(base)
        b.destroy_page(seg)
        b.release_range(base, 8 * ps)
        assert getattr(b, "num_mappings", 0) == 0


@pytest.mark.parametrize("kind", BACKENDS)
def test_backend_rejects_misuse(kind: str) -> None:
    with _backend(kind) as b:
        ps = b.page_size
        base = b.reserve(4 * ps)
        page = b.create_page()
        with pytest.raises(ValueError, match="page size"):
            b.map(base + 1, page)
        with pytest.raises(ValueError, match="does not exist"):
            b.map(base, page + 12345)
        b.map(base, page)
        with pytest.raises(ValueError, match="already mapped"):
            b.map(base, page)
        with pytest.raises(ValueError, match="still mapped"):
            b.destroy_page(page)
        with pytest.raises(ValueError, match="still has mapped"):
            b.release_range(base, 4 * ps)
        with pytest.raises(ValueError, match="nothing is mapped"):
            b.unmap(base + ps)
        b.unmap(base)
        b.destroy_page(page)
        with pytest.raises(ValueError, match="destroyed twice"):
            b.destroy_page(page)
    with pytest.raises(RuntimeError, match="closed"):
        b.create_page()


def test_cpu_page_size_must_fit_os_pages() -> None:
    with pytest.raises(ValueError, match="OS page size"):
        make_backend("cpu", page_size=1024)
    with pytest.raises(ValueError, match="unknown memory backend"):
        make_backend("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_backend_without_driver_says_so() -> None:
    with pytest.raises(NoCudaDriverError, match="CUDA") as err:
        make_backend("cuda")
    assert isinstance(err.value, MemoryBackendError)


def _process_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.parametrize("kind", BACKENDS)
def test_create_and_close_in_a_loop_leaks_nothing(kind: str) -> None:
    spec = make_spec(kind)

    def cycle() -> None:
        with VirtualKVCache(spec, kind, budget_bytes=1 << 40) as cache:
            for _ in range(spec.max_slots):
                s = cache.alloc_slot()
                cache.ensure(s, spec.max_seq_len)
            cache.free_slot(0)
            cache.step_async({1: 5})
            cache.wait()

    cycle()  # warm up lazily created state (thread pools, CUDA context)
    if kind == "cuda":
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
    maps_before = _process_mappings()
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        cycle()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    # A few lines of slack: the allocator and thread stacks may move; leaked caches add 10+.
    assert _process_mappings() <= maps_before + 4
    if kind == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.mem_get_info()[0] >= free_before - (2 << 20)
