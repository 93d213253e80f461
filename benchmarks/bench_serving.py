"""Serving traces through `LLM`: our engine on the vAttention cache vs the paged baseline.

Traces (seeded, token-id prompts, greedy, ignore EOS, every request submitted at once):
- `fixed`: N x P prompt tokens -> O output tokens (default 256 x 512 -> 128);
- `uneven`: prompts log-uniform in [128, 4096] (capped so prompt + output fit the model),
  outputs uniform in [32, 1024];
- `long-prompt`: prompts uniform in [2048, 7168], outputs uniform in [32, 512];
- `long-context`: prompts uniform in [16K, 64K], outputs uniform in [64, 256] (use a long-context
  preset: `llama-3.1-8b` or `yi-6b-200k`);
- `shared-prefix`: one system prompt of `--prefix-len` tokens (default 4096) before every
  prompt, distinct suffixes uniform in [32, 256], outputs uniform in [64, 256]: run it with
  systems `vattention+prefix,paged+prefix,vattention,paged` (`+prefix`: prefix caching on);
- `multi-turn`: conversations (default 64) of `--turns` turns (default 4): the first prompt
  uniform in [256, 1024] tokens, each later turn resends the conversation so far (prompts and
  the model's answers) plus 32-128 new user tokens; outputs uniform in [64, 256]. Every
  conversation's turn k is submitted once all turns k-1 are answered.

    python benchmarks/bench_serving.py --model yi-6b --trace uneven --out benchmarks/results/serving/x
    python benchmarks/bench_serving.py --quick          # CPU smoke test on the tiny preset

Per system it prints output and total tok/s, steps, preemptions, host seconds per engine phase
and, on CUDA, the GPU-busy share: kernel time from `torch.profiler` (CUDA activity only) on a
second run of the first `--busy-fraction` of the trace (default all of it; for multi-turn, of
fresh conversations of the same shape, since the timed run's are cached), over that run's wall
time and, for the whole trace, over the timed (unprofiled) run's wall time too. Each system
first runs a warm-up trace (excluded): a few requests of the trace's length range, then a few
full steps of its own shape with token ids shifted (`warmup_trace`), so that fewer kernels
compile inside a timed run. It does not catch every step shape yet: on the H200 the first
system of a process still spent 0.45 s in one eager step of its timed run (`--timeline`), and
its TTFT p50 read 20-35% higher than the next system's. Ratios vattention/paged come from the
same process.
The profiled run also reports where the GPU waited (`gpu.idle`: idle seconds between its first
and last kernel, gaps by size, and the largest gaps with the kernels around them), to tell host
stalls (long gaps before a step's first kernel) from GPU-bound time.
The profiled run also reports where the GPU waited (`gpu.idle`: idle seconds between its
first and last kernel, gaps by size, and the largest gaps with the kernels around them), to
tell host stalls (long gaps before a step's first kernel) from GPU-bound time.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vattention import LLM  # noqa: E402
from vattention.bench import run_requests  # noqa: E402
from vattention.models.presets import get_preset  # noqa: E402

TRACES = ("fixed", "uneven", "long-prompt", "long-context", "shared-prefix", "multi-turn")


def make_trace(args: argparse.Namespace, vocab: int, max_len: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output tokens) per request; seeded, so every system gets the same."""
    gen = torch.Generator().manual_seed(args.seed)
    n = args.num_requests
    scale = 64 if args.quick else 1  # --quick: lengths drawn at full scale, then divided
    full_len = max_len * scale

    def uniform(lo: int, hi: int) -> list[int]:
        return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()

    if args.trace == "fixed":
        prompt_lens, out_lens = [args.prompt_len] * n, [args.output_len] * n
    elif args.trace == "uneven":
        out_lens = uniform(32, 1024)
        hi = min(4096, full_len - 1024 - 1)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        prompt_lens = [int(round(math.exp(math.log(128) + x * math.log(hi / 128)))) for x in u]
    elif args.trace == "long-prompt":
        prompt_lens, out_lens = uniform(2048, 7168), uniform(32, 512)
    elif args.trace == "long-context":
        prompt_lens, out_lens = uniform(16384, 65536), uniform(64, 256)
    elif args.trace == "multi-turn":  # the first turns; `run_turns` makes the others
        prompt_lens, out_lens = uniform(256, 1024), uniform(64, 256)
    elif args.trace == "shared-prefix":
        prompt_lens, out_lens = uniform(32, 256), uniform(64, 256)  # suffixes, below
    else:
        raise ValueError(f"unknown trace {args.trace!r}; known: {TRACES}")
    if args.quick:  # shrink to the tiny preset's scale
        prompt_lens = [max(4, p // scale) for p in prompt_lens]
        out_lens = [max(2, o // scale) for o in out_lens]
    prefix: list[int] = []
    if args.trace == "shared-prefix":
        n = max(1, min(args.prefix_len // scale, max_len // 2))
        prefix = torch.randint(10, vocab - 10, (n,), generator=gen).tolist()
    trace = []
    for p, o in zip(prompt_lens, out_lens, strict=True):
        if prefix:  # leave room for the shared prefix
            o = min(o, max_len // 4)
        p = max(1, min(p, max_len - o - 1 - len(prefix)))
        ids = prefix + torch.randint(10, vocab - 10, (p,), generator=gen).tolist()
        trace.append((ids, o))
    return trace


def run_trace(
    llm: LLM, trace: list[tuple[list[int], int]], samples: list[dict[str, float]] | None = None,
    ttfts: list[float] | None = None,
) -> tuple[float, int, int]:  # fmt: skip
    """Submit every request, step until idle: (seconds, output tokens, steps); see
    `vattention.bench.run_requests` (greedy, ignore EOS, no detokenizing)."""
    return run_requests(llm.engine, trace, samples, ttfts=ttfts)


def run_trace_counted(
    llm: LLM, trace: list[tuple[list[int], int]], samples: list[dict[str, float]],
    ttfts: list[float],
) -> tuple[float, int, int, int]:  # fmt: skip
    """`run_trace`, plus the prompt tokens: (seconds, output tokens, steps, prompt tokens)."""
    seconds, generated, steps = run_trace(llm, trace, samples, ttfts)
    return seconds, generated, steps, sum(len(ids) for ids, _ in trace)


def run_turns(
    llm: LLM, trace: list[tuple[list[int], int]], turns: int, seed: int,
    samples: list[dict[str, float]] | None = None, ttfts: list[float] | None = None,
) -> tuple[float, int, int, int]:  # fmt: skip
    """The multi-turn trace: `trace` holds each conversation's first prompt and answer length;
    each turn is submitted at once, run to the end, then extended by the answers and new user
    tokens. Returns (seconds, output tokens, steps, prompt tokens) over all turns; `ttfts`
    gets every request's seconds from submission to first token."""
    from vattention import SamplingParams

    engine = llm.engine
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    convs = [list(ids) for ids, _ in trace]
    seconds = 0.0
    generated = steps = prompt_tokens = 0
    for _ in range(turns):
        _sync()
        t0 = time.perf_counter()
        owner = {}
        for i, ids in enumerate(convs):
            p = SamplingParams(temperature=0, max_tokens=trace[i][1], ignore_eos=True,
                               detokenize=False)  # fmt: skip
            owner[engine.add_request(ids, p)] = i
        answers: dict[int, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                answers[owner[out.request_id]] = list(out.token_ids)
                if ttfts is not None and out.metrics is not None and out.metrics.ttft is not None:
                    ttfts.append(out.metrics.ttft)
            steps += 1
            if samples is not None and steps % 16 == 0:
                sample = engine.cache.stats().as_dict()
                sample["running"] = float(engine.scheduler.num_running)
                samples.append(sample)
        _sync()
        seconds += time.perf_counter() - t0
        prompt_tokens += sum(len(c) for c in convs)
        generated += sum(len(a) for a in answers.values())
        for i in range(len(convs)):
            n = int(torch.randint(32, 129, (), generator=gen))
            user = torch.randint(10, vocab - 10, (n,), generator=gen).tolist()
            convs[i] = convs[i] + answers[i] + user
    return seconds, generated, steps, prompt_tokens


def latency_summary(xs: list[float]) -> dict[str, float]:
    """Mean, p50 and p99 (nearest rank) of latencies in seconds; {} for none. Offline traces
    submit every request at t=0, so TTFT here includes queueing behind earlier requests."""
    if not xs:
        return {}
    ys = sorted(xs)

    def rank(q: float) -> float:
        return ys[min(len(ys) - 1, max(0, math.ceil(q * len(ys)) - 1))]

    return {"mean": sum(ys) / len(ys), "p50": rank(0.5), "p99": rank(0.99), "n": float(len(ys))}


def memory_per_live_token(samples: list[dict[str, float]]) -> dict[str, float]:
    """Physical bytes held by used slots over bytes of live tokens, time-averaged (sum over
    sum) and at worst, from stats samples; plus the vattention split when it is there."""
    held_key = (
        "used_mapped_bytes" if samples and "used_mapped_bytes" in samples[0] else "used_bytes"
    )
    rows = [s for s in samples if s.get("live_bytes", 0) > 0]
    if not rows:
        return {}
    out = {
        "held_over_live_mean": sum(s[held_key] for s in rows) / sum(s["live_bytes"] for s in rows),
        "held_over_live_max": max(s[held_key] / s["live_bytes"] for s in rows),
        "samples": float(len(rows)),
        "running_mean": sum(s.get("running", 0.0) for s in rows) / len(rows),
    }
    if "shared_saved_bytes" in rows[0]:  # physical: a shared page counts once (a prefix
        # segment's pages are shared pages like any other)
        phys = [s[held_key] - s["shared_saved_bytes"] for s in rows]
        out["physical_over_live_mean"] = sum(phys) / sum(s["live_bytes"] for s in rows)
        out["shared_saved_bytes_max"] = max(s["shared_saved_bytes"] for s in rows)
    for key in ("slack_bytes", "lookahead_bytes", "reclaimable_bytes", "prepared_bytes"):
        if key in rows[0]:
            out[key.replace("_bytes", "_share_of_live")] = sum(s[key] for s in rows) / sum(
                s["live_bytes"] for s in rows
            )
    return out


def gpu_busy(run: Any, requests: int) -> dict[str, Any]:
    """Kernel seconds over wall seconds of one profiled `run()` (CUDA activity only; it returns
    (seconds, output tokens, steps, ...)), kernel seconds by category
    (`profile_engine.CATEGORIES`: attention, matmul, ...) and the top kernels."""
    from profile_engine import CATEGORIES, idle_gaps

    kind = "CUDA" if torch.cuda.is_available() else "CPU"  # CPU: the code path, no kernels
    with torch.profiler.profile(
        activities=[getattr(torch.profiler.ProfilerActivity, kind)]
    ) as prof:
        wall, _, steps = run()[:3]
    kernel_us = 0.0
    by_cat: dict[str, float] = {}
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in kernels:
        kernel_us += e.self_device_time_total
        cat = next((c for c, rx in CATEGORIES if rx.search(e.key)), "other")
        by_cat[cat] = by_cat.get(cat, 0.0) + e.self_device_time_total / 1e6
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:24]
    cuda = torch.autograd.DeviceType.CUDA
    spans = [
        (e.time_range.start, e.time_range.end, e.name) for e in prof.events()
        if e.device_type == cuda
    ]  # fmt: skip
    return {
        "busy_share": kernel_us / 1e6 / wall,
        "kernel_s": kernel_us / 1e6,
        "wall_s": wall,
        "steps": steps,
        "requests": requests,
        "kernel_s_by_category": {k: round(v, 3) for k, v in sorted(by_cat.items())},
        "top_kernels": [
            {"name": e.key[:120], "calls": e.count, "s": round(e.self_device_time_total / 1e6, 4)}
            for e in top
        ],
        "idle": idle_gaps(spans),
    }


def host_profile(fn: Any, top: int) -> tuple[Any, str]:
    """Run `fn()` under cProfile: (its result, the `top` functions by cumulative time and by
    own time)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    result = prof.runcall(fn)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return result, text.getvalue()


def system_overrides(system: str) -> dict[str, Any]:
    """The LLM options a system name sets after `%`: `vattention%key=json%key=json`, e.g.
    `vattention%attention_options={"cudnn_min_tokens":8192}` (two variants of one cache in
    one process)."""
    out: dict[str, Any] = {}
    for item in system.split("%")[1:]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"system {system!r}: expected %key=json after the name, got {item!r}")
        out[key] = json.loads(value)
    return out


def parse_system(system: str) -> tuple[str, bool, str | None]:
    """`kind[+prefix[-noseg]][@layout][%key=json...]` -> (cache kind, prefix caching,
    vAttention layout or None): e.g. `vattention`, `paged+prefix`,
    `vattention+prefix@cross_layer_kv`; `vattention+prefix-noseg` shares without prefix
    segments (every shared page mapped on its own, `kv_segment_min_pages=0`); options after
    `%` see `system_overrides`."""
    name, _, layout = system.split("%")[0].partition("@")
    kv_cache, _, extra = name.partition("+")
    if kv_cache not in ("vattention", "paged") or extra not in ("", "prefix", "prefix-noseg"):
        raise ValueError(
            f"unknown system {system!r}: vattention or paged, optionally with '+prefix' (or "
            f"'+prefix-noseg', vattention only), then optionally '@layout' (vattention only)"
        )
    if (layout or extra == "prefix-noseg") and kv_cache != "vattention":
        raise ValueError(f"system {system!r}: a layout or -noseg applies to vattention only")
    return kv_cache, extra.startswith("prefix"), layout or None


def engine_options(args: argparse.Namespace, system: str, max_len: int) -> dict[str, Any]:
    """LLM options of `system` (see `parse_system`)."""
    kv_cache, prefix, layout = parse_system(system)
    opts: dict[str, Any] = dict(
        kv_cache=kv_cache, load_format="dummy", dtype=args.dtype, max_model_len=max_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
        enforce_eager=args.eager, device=args.device, enable_prefix_caching=prefix,
    )  # fmt: skip
    if layout is not None:
        opts["kv_layout"] = layout
    if system.split("%")[0].partition("@")[0].endswith("-noseg"):
        opts["kv_segment_min_pages"] = 0
    if args.quick:
        opts["kv_page_size"] = 64 * 1024
    if kv_cache == "vattention" and args.attention_backend:
        opts["attention_backend"] = args.attention_backend
    if kv_cache == "paged" and args.paged_backend:
        opts["attention_backend"] = args.paged_backend
    if args.gpu_memory_utilization is not None:
        opts["gpu_memory_utilization"] = args.gpu_memory_utilization
    for item in args.opt:
        key, _, value = item.partition("=")
        opts[key] = json.loads(value)
    opts.update(system_overrides(system))
    return opts


def warmup_trace(
    trace: list[tuple[list[int], int]], quick: bool, step_tokens: int = 0, max_seqs: int = 0,
    vocab: int = 0,
) -> list[tuple[list[int], int]]:  # fmt: skip
    """A few requests of the trace's length range, short outputs, then (with `vocab`) the
    trace's first requests with every token id shifted by one, up to four full steps of
    `step_tokens` prompt tokens or `max_seqs` requests: the trace's own step shapes (large
    prefill steps, wide decode batches, shared prefixes), so that most of their kernels
    compile here and not in whichever system's timed run meets them first. Shifted ids keep
    the trace's sharing among themselves but put nothing in the prefix cache that the timed
    run could hit."""
    cap = 4 if quick else 16
    by_len = sorted(trace, key=lambda t: len(t[0]))
    pick = [by_len[0], by_len[len(by_len) // 2], by_len[-1]] + trace[:5]
    out = [(ids, min(o, cap)) for ids, o in pick]
    budget = 4 * step_tokens
    for ids, o in trace[: max_seqs if vocab else 0]:
        if budget <= 0:
            break
        out.append(([(t + 1) % vocab for t in ids], min(o, cap)))
        budget -= len(ids)
    return out


def _with_timeline(
    engine: Any, run: Callable[[], Any], log: list[dict[str, Any]], limit: int
) -> Callable[[], Any]:
    """`run` with the runner's `execute` wrapped to log the first `limit` steps: launch time
    (s since the run began), rows, decode rows, new tokens, how it ran (graph kind, cascade)
    and the host seconds of the launch (a diagnostic of where a trace's first steps go)."""
    runner = engine.runner
    inner = runner.execute
    start = [0.0]  # when the timed run began

    def execute(out: Any, *a: Any, **kw: Any) -> Any:
        if len(log) >= limit:
            return inner(out, *a, **kw)
        kinds, cascades, t = dict(runner.graph_steps), runner.cascade_steps, time.perf_counter()
        res = inner(out, *a, **kw)
        rows = out.scheduled
        log.append({
            "t": round(t - start[0], 4), "launch_s": round(time.perf_counter() - t, 4),
            "rows": len(rows), "decode_rows": sum(r.num_new_tokens == 1 for r in rows),
            "tokens": sum(r.num_new_tokens for r in rows),
            "kind": next((k for k, v in runner.graph_steps.items() if v != kinds[k]), "?"),
            "cascade": runner.cascade_steps != cascades,
        })  # fmt: skip
        return res

    def timed() -> Any:
        runner.execute = execute
        start[0] = time.perf_counter()
        try:
            return run()
        finally:
            del runner.execute  # the class's method again

    return timed


def _timeline_text(log: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{e['t']:8.4f}s +{e['launch_s']:.4f} {e['kind']:6s}{' cascade' if e['cascade'] else ''}"
        f" rows {e['rows']} (decode {e['decode_rows']}) tokens {e['tokens']}"
        for e in log
    )


def run_system(
    args: argparse.Namespace, kv_cache: str, trace: list[tuple[list[int], int]], max_len: int
) -> dict[str, Any]:
    opts = engine_options(args, kv_cache, max_len)
    system = kv_cache
    kv_cache = parse_system(system)[0]
    t0 = time.perf_counter()
    llm = LLM(args.model, **opts)
    setup = time.perf_counter() - t0
    try:
        vocab = int(llm.engine.model.config.vocab_size)
        warm = warmup_trace(trace, args.quick, args.max_batched_tokens, args.max_num_seqs, vocab)
        run_trace(llm, warm)
        engine = llm.engine
        engine.timings = dict.fromkeys(engine.timings, 0.0)
        preempt0 = engine.scheduler.num_preemptions
        hit0 = getattr(engine.scheduler.prefix, "hit_tokens", 0)
        engine.scheduler.max_running = 0
        samples: list[dict[str, float]] = []
        ttfts: list[float] = []
        profile_text = None
        if args.trace == "multi-turn":
            timed = functools.partial(run_turns, llm, trace, args.turns, args.seed, samples, ttfts)
        else:
            timed = functools.partial(run_trace_counted, llm, trace, samples, ttfts)
        timeline: list[dict[str, Any]] = []
        if args.timeline:
            timed = _with_timeline(engine, timed, timeline, args.timeline)
        if args.host_profile:  # a diagnostic: cProfile slows the host, so the times too
            (seconds, generated, steps, prompt_tokens), profile_text = host_profile(
                timed, args.host_profile
            )
            print(f"## host profile, {system}\n{profile_text}", flush=True)
        else:
            seconds, generated, steps, prompt_tokens = timed()
        result: dict[str, Any] = {
            "system": f"vattention engine, {system}",
            "kv_cache": system,
            "attention_backend": type(engine.attn).__name__,
            "cuda_graphs": engine.runner.graphs is not None,
            "seconds": seconds,
            "steps": steps,
            "output_tokens": generated,
            "output_tok_per_s": generated / seconds,
            "total_tok_per_s": (generated + prompt_tokens) / seconds,
            "preemptions": engine.scheduler.num_preemptions - preempt0,
            "max_running": engine.scheduler.max_running,
            "prefix_hit_tokens": getattr(engine.scheduler.prefix, "hit_tokens", 0) - hit0,
            "ttft_s": latency_summary(ttfts),
            "setup_s": setup,
            "phase_seconds": {k: round(v, 3) for k, v in engine.timings.items()},
            "host_ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in engine.timings.items()},
        }
        result["memory"] = memory_per_live_token(samples)
        if timeline:
            result["timeline"] = timeline
            print(f"## step timeline, {system}\n{_timeline_text(timeline)}", flush=True)
        if engine.memory_profile is not None:  # what the KV budget was sized from (bytes)
            result["memory_profile"] = engine.memory_profile.as_dict()
        stats = engine.cache.stats() if hasattr(engine.cache, "stats") else None
        if stats is not None:
            result["kv_stats"] = stats.as_dict() if hasattr(stats, "as_dict") else str(stats)
        steps_by_kind = getattr(engine.runner, "graph_steps", None)
        if steps_by_kind is not None:
            result["steps_by_kind"] = dict(steps_by_kind)  # warm-up and timed run together
            result["cascade_steps"] = getattr(engine.runner, "cascade_steps", 0)
        if args.busy_fraction > 0:  # on the CPU only the code path: no CUDA kernels
            part = trace[: max(1, int(len(trace) * args.busy_fraction))]
            if args.trace == "multi-turn":  # fresh conversations: the timed run's are cached
                fresh = argparse.Namespace(**{**vars(args), "seed": args.seed + 1})
                part = make_trace(fresh, engine.model_config.vocab_size, max_len)[: len(part)]
                run = functools.partial(run_turns, llm, part, args.turns, args.seed + 1)
            else:
                run = functools.partial(run_trace, llm, part)
            gpu = gpu_busy(run, len(part))
            if args.trace != "multi-turn" and len(part) == len(trace):  # the timed run's work
                gpu["busy_share_timed"] = gpu["kernel_s"] / seconds
            result["gpu"] = gpu
        return result
    finally:
        llm.close()
        del llm
        _free()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markdown(args: argparse.Namespace, info: dict[str, str], results: list[dict[str, Any]]) -> str:
    lines = [
        f"# Serving trace `{args.trace}` on `{args.model}`\n",
        f"Command: `{' '.join(sys.argv)}`  \nEnvironment: `{json.dumps(info)}`  \n",
        "| system | backend | graphs | seconds | steps | output tok/s | total tok/s | GPU busy "
        "| preemptions | running max (mean) | TTFT p50 / p99 s | host ms/step (schedule, execute, "
        "sync, update) | held/live mean (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | error: {r['error'][:160]} | | | | | | | | | | | |")
            continue
        gpu = r.get("gpu", {})
        busy = gpu.get("busy_share_timed", gpu.get("busy_share"))
        ms = r["host_ms_per_step"]
        host = ", ".join(f"{ms.get(k, 0):.2f}" for k in ("schedule", "execute", "sync", "update"))
        lines.append(
            f"| {r['kv_cache']} | {r['attention_backend']} | {r['cuda_graphs']} | "
            f"{r['seconds']:.2f} | {r['steps']} | {r['output_tok_per_s']:.0f} | "
            f"{r['total_tok_per_s']:.0f} | {'' if busy is None else f'{busy:.0%}'} | "
            f"{r['preemptions']} | {_running(r)} | {_ttft(r.get('ttft_s', {}))} | {host} | "
            f"{_held(r.get('memory', {}))} |"
        )
    ok = {r["kv_cache"]: r for r in results if "error" not in r}
    for name, a in ok.items():  # every vattention system against paged with the same sharing
        kind, prefix, _ = parse_system(name)
        b = ok.get("paged+prefix" if prefix else "paged")
        if kind == "vattention" and b is not None:
            ratio = a["output_tok_per_s"] / b["output_tok_per_s"]
            lines.append(
                f"\n{name} / {b['kv_cache']} (output tok/s, same process): **{ratio:.2f}x**"
            )
    hits = [
        f"{r['kv_cache']} {r['prefix_hit_tokens']}" for r in ok.values() if "+" in r["kv_cache"]
    ]
    if hits:
        lines.append("\nprompt tokens served from the prefix cache: " + ", ".join(hits))
    for r in ok.values():
        idle = r.get("gpu", {}).get("idle")
        if idle and idle["span_s"]:
            lines.append(f"\nGPU idle between kernels, {r['kv_cache']} (profiled run): "
                         + _idle(idle))  # fmt: skip
    return "\n".join(lines) + "\n"


def _idle(idle: dict[str, Any]) -> str:
    """One line: idle seconds of the span, the gaps by size class, the three largest."""
    sizes = ", ".join(f"{c} {n} ({sec:.3f} s)" for c, (n, sec) in idle["gaps_by_size"].items())
    big = "; ".join(f"{g['ms']:.1f} ms after {g['after'][:40]} before {g['before'][:40]}"
                    for g in idle["largest"][:3])  # fmt: skip
    return f"{idle['idle_s']:.3f} s of {idle['span_s']:.3f} s; gaps {sizes}; largest: {big}"


def _running(r: dict[str, Any]) -> str:
    mean = r.get("memory", {}).get("running_mean")
    return f"{r.get('max_running', '')}" + ("" if mean is None else f" ({mean:.0f})")


def _ttft(t: dict[str, float]) -> str:
    return "" if "p50" not in t else f"{t['p50']:.2f} / {t['p99']:.2f}"


def _held(m: dict[str, float]) -> str:
    if "held_over_live_mean" not in m:
        return ""
    held = f"{m['held_over_live_mean']:.3f} ({m['held_over_live_max']:.2f})"
    if "physical_over_live_mean" in m:  # a shared page counted once
        held += f"; physical {m['physical_over_live_mean']:.3f}"
    return held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yi-6b")
    ap.add_argument("--trace", default="uneven", choices=TRACES)
    ap.add_argument("--num-requests", type=int, default=None, help="default: per trace")
    ap.add_argument("--prompt-len", type=int, default=512, help="fixed trace")
    ap.add_argument("--output-len", type=int, default=128, help="fixed trace")
    ap.add_argument("--prefix-len", type=int, default=4096, help="shared-prefix trace")
    ap.add_argument("--turns", type=int, default=4, help="multi-turn trace")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--systems",
        default="vattention,paged",
        help="comma-separated kind[+prefix[-noseg]][@layout], e.g. "
        "vattention,vattention@cross_layer,paged or vattention+prefix,vattention+prefix-noseg,"
        "paged+prefix",
    )
    ap.add_argument("--attention-backend", default=None, help="vattention side (default auto)")
    ap.add_argument("--paged-backend", default=None, help="paged side (default pa_triton)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--opt", action="append", default=[], help="extra LLM option key=json")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument(
        "--busy-fraction", type=float, default=None, help="default 1 on CUDA, 0 elsewhere"
    )
    ap.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile the timed run, print the N top functions (a diagnostic)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--timeline",
        type=int,
        default=0,
        help="log the timed run's first N steps (launch time, rows, kind)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny preset on the CPU (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.num_requests is None:
        args.num_requests = {
            "fixed": 256,
            "uneven": 200,
            "long-prompt": 128,
            "shared-prefix": 256,
            "multi-turn": 64,
        }.get(args.trace, 8)
    if args.quick:
        args.model, args.dtype, args.device = "tiny", "float32", "cpu"
        args.num_requests, args.max_num_seqs = min(args.num_requests, 12), 8
        args.max_batched_tokens, args.prompt_len, args.output_len = 64, 16, 4
    if args.busy_fraction is None:
        args.busy_fraction = 1.0 if args.device == "cuda" else 0.0
    preset = get_preset(args.model)
    max_len = args.max_model_len or preset.max_position_embeddings
    if args.quick:
        max_len = min(max_len, 256)
    info = {
        "python": platform.python_version(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }  # fmt: skip
    config = {k: v for k, v in vars(args).items() if k != "out"} | {"max_model_len": max_len}
    trace = make_trace(args, preset.vocab_size, max_len)
    p = [len(ids) for ids, _ in trace]
    o = [n for _, n in trace]
    shape = {
        "requests": len(trace), "prompt_tokens": sum(p), "prompt_min": min(p),
        "prompt_max": max(p), "output_tokens": sum(o), "output_min": min(o), "output_max": max(o),
    }  # fmt: skip
    print("# bench_serving")
    print("config:", json.dumps({**config, **info}))
    print("trace:", json.dumps(shape), flush=True)
    results = []
    for system in args.systems.split(","):
        try:
            r = run_system(args, system, trace, max_len)
        except Exception as e:  # report and go on with the other systems
            r = {"system": system, "kv_cache": system, "error": f"{type(e).__name__}: {e}"}
            _free()
        results.append(r)
        print(json.dumps(r), flush=True)
    md = markdown(args, info, results)
    print("\n" + md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"info": info, "config": config, "trace": shape, "results": results}, f,
                      indent=1)  # fmt: skip
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
