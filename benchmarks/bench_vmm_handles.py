"""What one CUDA virtual-memory mapping costs by physical handle size and by thread count.

Question (2026-12-02): prefix sharing maps a cached prefix's pages into every new request's
range; on the H200 a ranged `cuMemSetAccess` over 128 separately created 2 MiB pages cost
~32 us per page (bench_memory's `shared_mapping`), i.e. ~14 ms per admission behind a 4K-token
prompt on Llama-3-8B. Is that cost per handle (so one large handle holding the whole prefix
would map in one cheap call) or per byte? And do calls from several threads overlap?

Times the calls through the CUDA memory backend (`vattention.memory.cuda.CudaBackend`, the
one the KV cache uses). Prints one JSON line per case (us per 2 MiB of mapped memory, and per
call); needs a CUDA GPU and cuda-bindings.
`python benchmarks/bench_vmm_handles.py [--total-mib 256] [--out DIR]`. (The results of
2026-12-02 were taken with direct driver calls, before the backend mapped many-page handles.)
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from vattention.memory.cuda import CudaBackend

MIB = 1 << 20


def by_handle_size(d: CudaBackend, total: int, handle: int, repeats: int) -> dict[str, float]:
    """Map `total` bytes made of handles of `handle` bytes into a fresh range, grant access in
    one ranged call, unmap; median over `repeats` of each phase."""
    hs = [d.create_page(handle // d.page_size) for _ in range(total // handle)]
    base = d.reserve(total)
    maps, grants, unmaps = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, h in enumerate(hs):
            d.map(base + i * handle, h)
        t1 = time.perf_counter()
        d.set_access(base, total)
        t2 = time.perf_counter()
        for i in range(len(hs)):
            d.unmap(base + i * handle)
        t3 = time.perf_counter()
        maps.append(t1 - t0)
        grants.append(t2 - t1)
        unmaps.append(t3 - t2)
    d.release_range(base, total)
    for h in hs:
        d.destroy_page(h)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e6  # noqa: E731
    n2 = total / (2 * MIB)
    return {
        "handle_mib": handle / MIB,
        "handles": float(len(hs)),
        "map_us": med(maps),
        "set_access_us": med(grants),
        "unmap_us": med(unmaps),
        "set_access_us_per_2mib": med(grants) / n2,
        "map_us_per_handle": med(maps) / len(hs),
    }


def threaded_grants(d: CudaBackend, pages: int, threads: int, repeats: int) -> dict[str, float]:
    """`threads` threads each map `pages` 2 MiB pages (the same physical pages, as sharers do)
    into their own range and grant access in one call: wall time, against one thread doing
    all of it."""
    g = d.page_size
    hs = [d.create_page() for _ in range(pages)]
    bases = [d.reserve(pages * g) for _ in range(threads)]

    def work(base: int) -> None:
        for i, h in enumerate(hs):
            d.map(base + i * g, h)
        d.set_access(base, pages * g)

    def undo() -> None:
        for base in bases:
            for i in range(pages):
                d.unmap(base + i * g)

    serial, parallel = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for base in bases:
            work(base)
        serial.append(time.perf_counter() - t0)
        undo()
        ts = [threading.Thread(target=work, args=(b,)) for b in bases]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        parallel.append(time.perf_counter() - t0)
        undo()
    for base in bases:
        d.release_range(base, pages * g)
    for h in hs:
        d.destroy_page(h)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    return {
        "threads": float(threads),
        "pages_each": float(pages),
        "serial_ms": med(serial),
        "parallel_ms": med(parallel),
        "speedup": med(serial) / med(parallel),
    }


def per_page_grants(d: CudaBackend, pages: int, repeats: int) -> dict[str, float]:
    """One `cuMemSetAccess` per 2 MiB page against one over the whole range (same pages)."""
    g = d.page_size
    hs = [d.create_page() for _ in range(pages)]
    base = d.reserve(pages * g)
    one, each = [], []
    for _ in range(repeats):
        for i, h in enumerate(hs):
            d.map(base + i * g, h)
        t0 = time.perf_counter()
        d.set_access(base, pages * g)
        one.append(time.perf_counter() - t0)
        for i in range(pages):
            d.unmap(base + i * g)
        for i, h in enumerate(hs):
            d.map(base + i * g, h)
        t0 = time.perf_counter()
        for i in range(pages):
            d.set_access(base + i * g, g)
        each.append(time.perf_counter() - t0)
        for i in range(pages):
            d.unmap(base + i * g)
    d.release_range(base, pages * g)
    for h in hs:
        d.destroy_page(h)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e6 / pages  # noqa: E731
    return {"pages": float(pages), "ranged_us_per_page": med(one), "each_us_per_page": med(each)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-mib", type=int, default=256, help="bytes mapped per case")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write results.json here")
    args = ap.parse_args()
    d = CudaBackend("cuda")
    total = args.total_mib * MIB
    results: dict[str, Any] = {"config": vars(args), "granularity": d.page_size}
    print(json.dumps(results["config"]), "granularity", d.page_size, flush=True)
    create = []
    for _ in range(3):
        t0 = time.perf_counter()
        h = d.create_page(total // d.page_size)
        create.append(time.perf_counter() - t0)
        d.destroy_page(h)
    results["create_one_handle_of_total_ms"] = sorted(create)[1] * 1e3
    print("cuMemCreate of one", args.total_mib, "MiB handle:",
          round(results["create_one_handle_of_total_ms"], 3), "ms", flush=True)  # fmt: skip
    results["by_handle_size"] = []
    for mib in (2, 8, 32, 128, args.total_mib):
        if total % (mib * MIB) or mib * MIB < d.page_size:
            continue
        r = by_handle_size(d, total, mib * MIB, args.repeats)
        results["by_handle_size"].append(r)
        print("handle size:", json.dumps({k: round(v, 2) for k, v in r.items()}), flush=True)
    r = per_page_grants(d, total // d.page_size, args.repeats)
    results["per_page_grants"] = r
    print("grant per page:", json.dumps({k: round(v, 2) for k, v in r.items()}), flush=True)
    results["threads"] = []
    for threads in (2, 4, 8):
        r = threaded_grants(d, 128, threads, 3)
        results["threads"].append(r)
        print("threads:", json.dumps({k: round(v, 2) for k, v in r.items()}), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    d.close()


if __name__ == "__main__":
    main()
