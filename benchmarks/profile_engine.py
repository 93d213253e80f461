"""Where a generate() step spends GPU time: torch.profiler over a short run of the engine.

    python benchmarks/profile_engine.py --num-requests 64 --out /tmp/prof

Prints the top CUDA kernels by total time for the whole run (warm-up excluded) and writes the
table to `--out`. A diagnostic, not a benchmark: profiling adds overhead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vattention import LLM, SamplingParams  # noqa: E402

CATEGORIES = (  # first match wins
    ("attention", re.compile(r"flash|fmha|cudnn|attn|attention|decode|_split_kernel", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|splitk", re.I)),
    ("norm", re.compile(r"norm", re.I)),
    ("rope/silu (fused)", re.compile(r"rope|silu", re.I)),
    ("copy/index", re.compile(r"copy|index|gather|scatter|cat|memcpy|memset", re.I)),
)


# upper bounds (microseconds) of the idle-gap size classes `idle_gaps` reports
GAP_BOUNDS_US = (20.0, 100.0, 1_000.0, 10_000.0)


def idle_gaps(kernels: list[tuple[float, float, str]], top: int = 10) -> dict[str, object]:
    """Where the GPU waited between the first and the last kernel of `kernels` ((start us,
    end us, name); overlapping kernels, e.g. on two streams, count as one busy interval):
    the idle seconds, the busy span, the gaps by size class (count, seconds) and the `top`
    largest gaps with the kernels that ended before and started after each: which kernels a
    host-side stall falls between (a step's first kernel after a long gap: the host was late)."""
    spans = sorted(kernels)
    classes = [f"<{b:g}us" for b in GAP_BOUNDS_US] + [f">={GAP_BOUNDS_US[-1]:g}us"]
    by_class = {c: [0, 0.0] for c in classes}
    gaps: list[tuple[float, str, str]] = []
    if not spans:
        return {"idle_s": 0.0, "span_s": 0.0, "gaps_by_size": by_class, "largest": []}
    end, last = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            us = start - end
            gaps.append((us, last, name))
            c = next((i for i, b in enumerate(GAP_BOUNDS_US) if us < b), len(GAP_BOUNDS_US))
            by_class[classes[c]][0] += 1
            by_class[classes[c]][1] += us / 1e6
        if stop >= end:
            end, last = stop, name
    largest = sorted(gaps, reverse=True)[:top]
    return {
        "idle_s": sum(g[0] for g in gaps) / 1e6,
        "span_s": (end - spans[0][0]) / 1e6,
        "gaps_by_size": {c: [n, round(sec, 6)] for c, (n, sec) in by_class.items()},
        "largest": [
            {"ms": round(us / 1e3, 3), "after": a[:80], "before": b[:80]} for us, a, b in largest
        ],
    }


def summarize(prof: torch.profiler.profile, wall: float) -> str:
    """GPU time by kernel category and the top kernels (self device time, whole run)."""
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / 1e6
    by_cat: dict[str, float] = {}
    for e in kernels:
        cat = next((c for c, rx in CATEGORIES if rx.search(e.key)), "other")
        by_cat[cat] = by_cat.get(cat, 0.0) + e.self_device_time_total / 1e6
    lines = [f"GPU kernel time {total:.3f} s of {wall:.3f} s wall ({total / wall:.0%} busy)", ""]
    lines += ["| category | seconds | share |", "|---|---|---|"]
    for cat, sec in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {sec:.3f} | {sec / max(total, 1e-9):.1%} |")
    lines += ["", "| kernel | calls | seconds | share |", "|---|---|---|---|"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:30]:
        sec = e.self_device_time_total / 1e6
        lines.append(f"| {e.key[:90]} | {e.count} | {sec:.4f} | {sec / max(total, 1e-9):.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--kv-cache", default="vattention")
    ap.add_argument("--out", default=None)
    ap.add_argument("--host", action="store_true", help="cProfile the host side instead")
    ap.add_argument("--max-batched-tokens", type=int, default=16384)
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", kv_cache=args.kv_cache,
              max_model_len=args.prompt_len + args.output_len + 16, max_num_seqs=256,
              max_num_batched_tokens=args.max_batched_tokens)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 1000, (args.num_requests, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)
    torch.cuda.synchronize()
    llm.engine.timings = dict.fromkeys(llm.engine.timings, 0.0)
    if args.host:  # where the host's time goes (main thread), by own time and cumulative
        import cProfile
        import io
        import pstats

        prof_host = cProfile.Profile()
        prof_host.enable()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        prof_host.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof_host, stream=buf)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats("scheduler|virtual|model_runner|sampler", 30)
        print(buf.getvalue())
        print("engine phases (s):", {k: round(v, 3) for k, v in llm.engine.timings.items()})
        llm.close()
        return
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    table = summarize(prof, wall)
    print(f"wall {wall:.3f} s for {args.num_requests} x ({args.prompt_len} + {args.output_len})")
    print(table)
    print("engine phases (s):", {k: round(v, 3) for k, v in llm.engine.timings.items()})
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write(table)
    llm.close()


if __name__ == "__main__":
    main()
