"""Memory-library benchmark: VMM call latencies, mapping throughput, and the step time of a
GPU workload that needs new pages every step (synchronous mapping vs `step_async` vs a fully
pre-mapped cache).

Run on the GPU:  python benchmarks/bench_memory.py --out benchmarks/results/memory
On the CPU (smoke test of the same code on the mmap backend):  python benchmarks/bench_memory.py --quick

Warm-up is excluded everywhere; latencies are medians over many calls; step times are the mean
of the timed steps (each step ends in a device synchronize, as an engine's sampling does).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vattention import KVCacheSpec, VirtualKVCache  # noqa: E402
from vattention.memory.backend import MemoryBackend, make_backend  # noqa: E402


def banner(device: str) -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
    }
    if device == "cuda":
        info["cuda"] = str(torch.version.cuda)
        try:
            from cuda.bindings import driver

            info["driver"] = str(driver.cuDriverGetVersion()[1])
        except Exception:  # pragma: no cover
            pass
    return info


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def call_latencies(backend: MemoryBackend, n: int) -> dict[str, float]:
    """Median per-page latency (us) of each backend call, measured one call at a time."""
    ps = backend.page_size
    base = backend.reserve(n * ps)
    t = time.perf_counter
    create, mapping, access, unmap, destroy = [], [], [], [], []
    pages = []
    for _ in range(n):
        s = t()
        pages.append(backend.create_page())
        create.append(t() - s)  # noqa: E702
    for i, p in enumerate(pages):
        s = t()
        backend.map(base + i * ps, p)
        mapping.append(t() - s)  # noqa: E702
        s = t()
        backend.set_access(base + i * ps, ps)
        access.append(t() - s)  # noqa: E702
    for i in range(n):
        s = t()
        backend.unmap(base + i * ps)
        unmap.append(t() - s)  # noqa: E702
    # set-access over a whole contiguous range in one call
    for i, p in enumerate(pages):
        backend.map(base + i * ps, p)
    s = t()
    backend.set_access(base, n * ps)
    ranged = (t() - s) / n  # noqa: E702
    for i in range(n):
        backend.unmap(base + i * ps)
    for p in pages:
        s = t()
        backend.destroy_page(p)
        destroy.append(t() - s)  # noqa: E702
    backend.release_range(base, n * ps)
    return {
        "create_us": _median_us(create[n // 8 :]),  # the first creations are slower: warm-up
        "create_first_us": create[0] * 1e6,
        "map_us": _median_us(mapping),
        "set_access_us": _median_us(access),
        "set_access_ranged_us_per_page": ranged * 1e6,
        "unmap_us": _median_us(unmap),
        "release_us": _median_us(destroy),
    }


def shared_mapping(backend: MemoryBackend, n: int, copies: int) -> dict[str, float]:
    """What prefix sharing pays per admission: map the same `n` pages into `copies` separate
    ranges (as many slots behind one system prompt), each with one ranged set-access. us per
    page for the first range (pages mapped nowhere else) and the mean of the others."""
    ps = backend.page_size
    pages = [backend.create_page() for _ in range(n)]
    bases = [backend.reserve(n * ps) for _ in range(copies)]
    t = time.perf_counter
    per_copy: list[tuple[float, float]] = []
    for base in bases:
        s = t()
        for i, p in enumerate(pages):
            backend.map(base + i * ps, p)
        m = t()
        backend.set_access(base, n * ps)
        per_copy.append(((m - s) / n * 1e6, (t() - m) / n * 1e6))
    for base in bases:
        for i in range(n):
            backend.unmap(base + i * ps)
        backend.release_range(base, n * ps)
    for p in pages:
        backend.destroy_page(p)
    rest = per_copy[1:] or per_copy
    return {
        "pages": float(n),
        "copies": float(copies),
        "first_map_us_per_page": per_copy[0][0],
        "first_set_access_us_per_page": per_copy[0][1],
        "shared_map_us_per_page": sum(c[0] for c in rest) / len(rest),
        "shared_set_access_us_per_page": sum(c[1] for c in rest) / len(rest),
    }


def busy_gpu_mapping(backend: MemoryBackend, n: int) -> dict[str, float]:
    """Map + grant `n` pages while the GPU runs a queue of matmuls: do the calls wait for it?"""
    ps = backend.page_size
    base = backend.reserve(n * ps)
    pages = [backend.create_page() for _ in range(n)]
    a = torch.randn(8192, 8192, device=backend.device, dtype=torch.bfloat16)
    out: dict[str, float] = {}
    for label, busy in (("idle", False), ("busy", True)):
        torch.cuda.synchronize()
        if busy:
            for _ in range(30):
                a @ a
        t0 = time.perf_counter()
        for i, p in enumerate(pages):
            backend.map(base + i * ps, p)
            backend.set_access(base + i * ps, ps)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        for i in range(n):
            backend.unmap(base + i * ps)
        out[f"{label}_map_grant_us_per_page"] = (t1 - t0) / n * 1e6
        out[f"{label}_gpu_tail_ms"] = (t2 - t1) * 1e3
    for p in pages:
        backend.destroy_page(p)
    backend.release_range(base, n * ps)
    return out


def mapping_throughput(spec: KVCacheSpec, device: str, pool_ready: bool) -> dict[str, float]:
    """Back every slot to its full length through `step`; pages/s and GB/s mapped."""
    with VirtualKVCache(
        spec,
        device,
        budget_fraction=0.5 if device == "cuda" else None,
        budget_bytes=None if device == "cuda" else 1 << 33,
    ) as cache:
        slots = [cache.alloc_slot() for _ in range(spec.max_slots)]
        pages = cache.layout.pages_per_slot * cache.layout.num_buffers * len(slots)
        if pool_ready:
            cache.prefill_pool(pages)
        start = time.perf_counter()
        cache.step({s: spec.max_seq_len for s in slots})
        cache._backend.synchronize()
        dt = time.perf_counter() - start
        return {
            "pages": pages,
            "seconds": dt,
            "pages_per_s": pages / dt,
            "GB_per_s": pages * cache.page_size / dt / 1e9,
        }


@dataclass
class Workload:
    """A Llama-3-8B-shaped decode step: the model's matmuls plus KV writes into new pages."""

    batch: int
    hidden: int
    inter: int
    layers: int
    device: str
    dtype: torch.dtype

    def __post_init__(self) -> None:
        g = torch.Generator(device=self.device).manual_seed(0)

        def w(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device=self.device, dtype=self.dtype) * 0.02

        h, i = self.hidden, self.inter
        self.weights = [
            (w(h, h + 2 * 1024), w(h, h), w(h, 2 * i), w(i, h)) for _ in range(self.layers)
        ]
        self.x = torch.randn(self.batch, h, generator=g, device=self.device, dtype=self.dtype)

    def with_rows(self, rows: int) -> Workload:
        """The same weights over `rows` new tokens (a prefill-shaped step)."""
        other = copy.copy(self)
        other.batch = rows
        other.x = torch.randn(rows, self.hidden, device=self.device, dtype=self.dtype)
        return other

    def run(self, cache: VirtualKVCache, slots: torch.Tensor, positions: torch.Tensor) -> None:
        x = self.x
        spec = cache.spec
        for layer, (qkv, o, gate_up, down) in enumerate(self.weights):
            y = x @ qkv
            k = y[:, self.hidden : self.hidden + spec.num_kv_heads * spec.head_dim]
            kv = k.reshape(-1, spec.num_kv_heads, spec.head_dim)
            cache.k_cache(layer)[slots, positions] = kv  # touches the newest pages
            cache.v_cache(layer)[slots, positions] = kv
            x = y[:, : self.hidden] @ o
            x = (x @ gate_up)[:, : self.inter] @ down
        self.out = x


def step_times(
    spec: KVCacheSpec,
    device: str,
    mode: str,
    steps: int,
    warmup: int,
    tokens_per_step: int,
    work: Workload,
    graph: bool = False,
    churn_pages: int = 0,
    churn_kind: str = "all",
    slots_n: int | None = None,
) -> dict[str, float]:
    """Mean step time for one mapping mode over `steps` timed steps.

    With `graph`, the step's kernels are one CUDA-graph replay (as the engine's decode runs),
    which is valid across steps because the cache's addresses never move. By default each of
    `work.batch` slots gets one row a step (its newest token: a decode step); with `slots_n`,
    `slots_n` slots get `tokens_per_step` rows each (all their new tokens: a prefill chunk),
    so `work.batch` must be `slots_n * tokens_per_step`."""
    gen = torch.Generator().manual_seed(1)
    # "async_bursts": the look-ahead tops up only once some slot has < 64 tokens of it left,
    # in larger, rarer bursts, instead of whenever any slot lacks it (the default, "async").
    bursts: dict[str, object] = {"lookahead_trigger_tokens": 64} if mode == "async_bursts" else {}
    # "inline": the same job on the launching thread, right after the launch (no thread).
    if mode == "inline":
        bursts["mapping"] = "inline"
    mode = "async" if mode in ("async_bursts", "inline") else mode
    with VirtualKVCache(
        spec,
        device,
        budget_bytes=None if device == "cuda" else 1 << 34,
        budget_fraction=0.5 if device == "cuda" else None,
        lookahead_tokens=128,
        **bursts,  # type: ignore[arg-type]
    ) as cache:
        tpp = int(cache.layout.tokens_per_page)
        per_slot = 1 if slots_n is None else tokens_per_step  # rows a slot writes a step
        if (slots_n or work.batch) * per_slot != work.batch:
            raise ValueError(f"{work.batch} rows are not {slots_n} slots x {per_slot} tokens")
        slots = [cache.alloc_slot() for _ in range(slots_n or work.batch)]
        # Stagger lengths so slots cross page boundaries on different steps.
        start = [int(x) for x in torch.randint(tpp, 4 * tpp, (len(slots),), generator=gen)]
        total = warmup + steps + 1
        if mode in ("premapped", "churn"):
            cache.step(
                {
                    s: min(spec.max_seq_len, start[i] + total * tokens_per_step)
                    for i, s in enumerate(slots)
                }
            )
        else:
            cache.step({s: start[i] for i, s in enumerate(slots)})

        def rows_at(lengths: list[int]) -> list[int]:  # positions of a step's rows
            return [n + tokens_per_step - per_slot + j for n in lengths for j in range(per_slot)]

        slot_t = torch.tensor([s for s in slots for _ in range(per_slot)], device=device)
        pos_t = torch.tensor(rows_at(start), device=device)
        replay = None
        if graph:
            cache.step({s: start[i] + tokens_per_step for i, s in enumerate(slots)})
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                work.run(cache, slot_t, pos_t)  # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                work.run(cache, slot_t, pos_t)
            replay = g.replay
            pos_host = torch.empty(len(slot_t), dtype=torch.int64, pin_memory=True)
        sync = cache._backend.synchronize
        churn = None
        if mode == "churn":  # pre-mapped, plus unrelated map/grant/unmap work on a thread
            from concurrent.futures import ThreadPoolExecutor

            be = cache._backend
            scratch = be.reserve(churn_pages * be.page_size)
            scratch_pages = [be.create_page() for _ in range(churn_pages)]
            pool = ThreadPoolExecutor(1)

            def map_all() -> None:
                for i, p in enumerate(scratch_pages):
                    be.map(scratch + i * be.page_size, p)
                    be.set_access(scratch + i * be.page_size, be.page_size)

            def unmap_all() -> None:
                for i in range(churn_pages):
                    be.unmap(scratch + i * be.page_size)

            # What runs on the thread during the timed step; the rest runs untimed after it.
            timed_job, untimed = {
                "all": (lambda: (map_all(), unmap_all()), None),
                "map": (map_all, unmap_all),
                "unmap": (unmap_all, map_all),
            }[churn_kind]
            if churn_kind == "unmap":
                map_all()

            churn = pool
        times: list[float] = []
        calls0 = cache.stats().map_calls
        lengths = list(start)
        if mode == "async":
            cache.step_async({s: lengths[i] + tokens_per_step for i, s in enumerate(slots)})
        for it in range(warmup + steps):
            if it == warmup:
                calls0 = cache.stats().map_calls
            t0 = time.perf_counter()
            nxt = [n + tokens_per_step for n in lengths]
            if mode == "sync":
                cache.step({s: nxt[i] for i, s in enumerate(slots)})
            elif mode == "async":
                cache.wait()  # pages for this step were mapped during the previous one
            new_pos = rows_at(lengths)
            if replay is not None:
                pos_host.copy_(torch.tensor(new_pos))
                pos_t.copy_(pos_host, non_blocking=True)
                replay()
            else:
                pos_t.copy_(torch.tensor(new_pos))
                work.run(cache, slot_t, pos_t)
            # Once this step is launched, map what the next one needs while it runs (as the
            # engine does): the mapping thread never delays a launch.
            if mode == "async":
                cache.step_async({s: nxt[i] + tokens_per_step for i, s in enumerate(slots)})
            elif churn is not None:
                churn.submit(timed_job).result()
            sync()
            times.append(time.perf_counter() - t0)
            if churn is not None and untimed is not None:
                untimed()
            lengths = nxt
        cache.wait()
        if churn is not None:
            churn.shutdown()
            if churn_kind == "unmap":
                unmap_all()
            for p in scratch_pages:
                cache._backend.destroy_page(p)
            cache._backend.release_range(scratch, churn_pages * cache._backend.page_size)
        timed = times[warmup:]
        return {
            "mean_ms": statistics.fmean(timed) * 1e3,
            "median_ms": statistics.median(timed) * 1e3,
            "p99_ms": sorted(timed)[int(0.99 * (len(timed) - 1))] * 1e3,
            "map_calls_per_step": (cache.stats().map_calls - calls0) / steps,
        }


MODES = ("premapped", "sync", "async", "async_bursts", "inline")


def _step_row(launch: str, layout: str, tps: int, r: dict[str, dict[str, float]]) -> dict:  # type: ignore[type-arg]
    """One row of the step-time table from each mode's timings (`step_times`), printed."""
    base = r["premapped"]["mean_ms"]
    row = {
        "launch": launch,
        "layout": layout,
        "tokens_per_step": tps,
        **{f"{m}_ms": r[m]["mean_ms"] for m in r},
        **{f"{m}_overhead": r[m]["mean_ms"] / base - 1 for m in MODES[1:]},
        "map_calls_per_step": r["sync"]["map_calls_per_step"],
        "detail": r,
    }
    print(
        f"step time {launch:10s} {layout:14s} +{tps} tok/step: premapped {base:7.3f} ms | sync "
        f"{r['sync']['mean_ms']:7.3f} ms ({row['sync_overhead']:+.2%}) | async "
        f"{r['async']['mean_ms']:7.3f} ms ({row['async_overhead']:+.2%}) | async in bursts "
        f"{r['async_bursts']['mean_ms']:7.3f} ms ({row['async_bursts_overhead']:+.2%}) | "
        f"inline after launch {r['inline']['mean_ms']:7.3f} ms ({row['inline_overhead']:+.2%})"
        f" | {row['map_calls_per_step']:.1f} map calls/step"
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    dev = args.device
    quick = args.quick or dev == "cpu"
    info = banner(dev)
    page = None if dev == "cuda" else 64 * 1024
    if quick:
        layers, heads, dim, hidden, inter, batch, steps = 2, 2, 64, 256, 512, 8, 20
        dtype = torch.float32
    else:
        layers, heads, dim, hidden, inter, batch, steps = 32, 8, 128, 4096, 14336, 64, args.steps
        dtype = torch.bfloat16
    print("# bench_memory")
    print(
        "config:",
        json.dumps(
            {
                "device": dev,
                **info,
                "layers": layers,
                "kv_heads": heads,
                "head_dim": dim,
                "dtype": str(dtype),
                "batch": batch,
                "steps": steps,
            }
        ),
    )
    results: dict[str, object] = {"info": info}
    backend = make_backend(dev, page_size=page)
    results["latency_us"] = call_latencies(backend, 64 if quick else 512)
    results["shared_mapping"] = shared_mapping(backend, 16 if quick else 128, 4 if quick else 32)
    print("same pages mapped into several ranges (prefix sharing):",
          json.dumps({k: round(v, 2) for k, v in results["shared_mapping"].items()}))  # fmt: skip
    if dev == "cuda":
        results["busy_gpu"] = busy_gpu_mapping(backend, 32)
        print("map+grant while the GPU is busy:", json.dumps(results["busy_gpu"]))
    backend.close()
    print(
        "per-page latency (us, median):",
        json.dumps({k: round(v, 2) for k, v in results["latency_us"].items()}),
    )  # type: ignore[union-attr]

    thr: dict[str, object] = {}
    for layout in ("cross_layer_kv", "cross_layer", "per_layer"):
        spec = KVCacheSpec(
            num_layers=layers,
            num_kv_heads=heads,
            head_dim=dim,
            max_slots=8,
            max_seq_len=2048 if quick else 32768,
            dtype=dtype,
            page_size=page,
            layout=layout,
        )
        for pool_ready in (False, True):
            r = mapping_throughput(spec, dev, pool_ready)
            thr[f"{layout}/{'pooled' if pool_ready else 'create+map'}"] = r
            print(
                f"mapping throughput {layout:14s} {'pool ready' if pool_ready else 'create+map':10s}: "
                f"{r['pages_per_s']:10.0f} pages/s  {r['GB_per_s']:7.2f} GB/s"
            )
    results["throughput"] = thr

    work = Workload(batch, hidden, inter, layers, dev, dtype)
    rows = []
    for graph in (False, True) if dev == "cuda" else (False,):
        for layout in ("cross_layer_kv", "cross_layer", "per_layer"):
            for tps in (1, 8):
                spec = KVCacheSpec(
                    num_layers=layers,
                    num_kv_heads=heads,
                    head_dim=dim,
                    max_slots=batch,
                    max_seq_len=(4096 if quick else 16384),
                    dtype=dtype,
                    page_size=page,
                    layout=layout,
                )
                r = {
                    m: step_times(spec, dev, m, steps, 20 if not quick else 3, tps, work, graph)
                    for m in MODES
                }
                rows.append(_step_row("cuda-graph" if graph else "eager", layout, tps, r))
    # The engine runs steps eagerly only above its mixed-graph token bucket (or when graphs are
    # off): prefill-shaped steps, where the GPU, not the launching thread, sets the pace.
    chunk, nslots = (16, 2) if quick else (128, 16)
    pre_steps = min(steps, 60)
    spec = KVCacheSpec(
        num_layers=layers, num_kv_heads=heads, head_dim=dim, max_slots=nslots,
        max_seq_len=(4096 if quick else 16384), dtype=dtype, page_size=page,
        layout="cross_layer_kv",
    )  # fmt: skip
    pre_work = work.with_rows(nslots * chunk)
    r = {
        m: step_times(
            spec, dev, m, pre_steps, 3 if quick else 10, chunk, pre_work, slots_n=nslots
        )  # fmt: skip
        for m in MODES
    }
    rows.append(_step_row(f"eager, {nslots} x {chunk}-token chunks", "cross_layer_kv", chunk, r))
    results["step"] = rows
    if dev == "cuda":
        spec = KVCacheSpec(
            num_layers=layers,
            num_kv_heads=heads,
            head_dim=dim,
            max_slots=batch,
            max_seq_len=16384,
            dtype=dtype,
            page_size=page,
        )
        inter_rows = []
        for k, kind in ((0, "none"), (4, "all"), (64, "all"), (4, "map"), (64, "map"),
                        (4, "unmap"), (64, "unmap")):  # fmt: skip
            mode = "churn" if k else "premapped"
            r = step_times(spec, dev, mode, steps, 20, 1, work, True, k, kind)
            inter_rows.append({"pages_per_step": k, "work": kind, **r})
            what = {"all": "map+grant+unmap", "map": "map+grant", "unmap": "unmap"}.get(kind, "-")
            print(f"interference: {k:3d} pages/step, {what:15s} on a thread: {r['mean_ms']:.3f} ms")
        results["interference"] = inter_rows
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(render_markdown(results, " ".join(sys.argv)))
    print("\n" + render_markdown(results, " ".join(sys.argv)))


def render_markdown(results: dict, command: str) -> str:  # type: ignore[type-arg]
    lat = results["latency_us"]
    lines = [
        f"# Memory benchmark\n\nCommand: `{command}`  \nEnvironment: `{json.dumps(results['info'])}`\n",
        "## Per-page latency (median, us, through the backend's Python API)\n",
        "| create | map | set-access (one page) | set-access (per page, one call over the range) | unmap | release |",
        "|---|---|---|---|---|---|",
        f"| {lat['create_us']:.1f} | {lat['map_us']:.1f} | {lat['set_access_us']:.1f} | "
        f"{lat['set_access_ranged_us_per_page']:.2f} | {lat['unmap_us']:.1f} | {lat['release_us']:.1f} |\n",
        "## Mapping throughput (`step` backing 8 slots to full length)\n",
        "| layout / pool | pages/s | GB/s |",
        "|---|---|---|",
    ]
    for k, v in results["throughput"].items():
        lines.append(f"| {k} | {v['pages_per_s']:.0f} | {v['GB_per_s']:.2f} |")
    if "interference" in results:
        lines += [
            "\n## GPU cost of unrelated mapping work (pre-mapped cache, CUDA graph, a thread "
            "works on N scratch pages after each step's launch; the rest of the cycle runs "
            "untimed)\n",
            "| N pages/step | work on the thread | step ms | median ms |",
            "|---|---|---|---|",
        ]
        for r in results["interference"]:
            lines.append(
                f"| {r['pages_per_step']} | {r.get('work', 'all')} | {r['mean_ms']:.3f} | "
                f"{r['median_ms']:.3f} |"
            )
    lines += [
        "\n## Step time of a workload that needs new pages every step\n",
        "| launch | layout | tokens/step | pre-mapped ms | sync ms (overhead) | step_async ms (overhead) | step_async, look-ahead in bursts, ms (overhead) | step_async inline after the launch, ms (overhead) | map calls/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["step"]:
        lines.append(
            f"| {r['launch']} | {r['layout']} | {r['tokens_per_step']} | {r['premapped_ms']:.3f} | "
            f"{r['sync_ms']:.3f} ({r['sync_overhead']:+.2%}) | {r['async_ms']:.3f} "
            f"({r['async_overhead']:+.2%}) | {r['async_bursts_ms']:.3f} "
            f"({r['async_bursts_overhead']:+.2%}) | {r['inline_ms']:.3f} "
            f"({r['inline_overhead']:+.2%}) | {r['map_calls_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
