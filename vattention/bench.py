"""`vattention bench`: offline throughput of one engine on a seeded trace.

Traces: `fixed` (N prompts of P tokens, O output tokens each), `uneven` (prompt lengths
log-uniform in [P/4, 4P], outputs uniform in [1, O]) and `shared-prefix` (one P-token system
prompt before every request, then P/8 distinct tokens; O output tokens: what prefix caching
is for); token-id prompts drawn from the model's vocabulary, greedy, ignore EOS, no
detokenizing. A short warm-up run is excluded. The result
reports the configuration, seconds, output and total tokens per second, steps and preemptions.
(`benchmarks/bench_serving.py` compares both caches side by side with GPU-busy figures.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

TRACES = ("fixed", "uneven", "shared-prefix")


def make_trace(
    kind: str, n: int, prompt_len: int, output_len: int, vocab: int, max_len: int, seed: int = 0
) -> list[tuple[list[int], int]]:
    """(prompt ids, output tokens) per request, capped so each fits `max_len`."""
    if kind not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {kind!r}")
    if n < 1 or prompt_len < 1 or output_len < 1:
        raise ValueError("num_requests, prompt_len and output_len must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    high = max(4, vocab - 1)
    system: list[int] = []
    suffix = max(1, prompt_len // 8)
    if kind == "shared-prefix":  # as long as asked, leaving room for the suffix and output
        room = max_len - max(1, min(output_len, max_len - 2)) - 1
        size = max(1, min(prompt_len, room - suffix))
        system = torch.randint(3, high, (size,), generator=gen).tolist()
    trace = []
    for _ in range(n):
        if kind == "shared-prefix":
            o = output_len
            p = len(system) + suffix
        elif kind == "fixed":
            p, o = prompt_len, output_len
        else:
            lo, hi = max(1, prompt_len // 4), 4 * prompt_len
            u = float(torch.rand((), generator=gen))
            p = int(round(math.exp(math.log(lo) + u * math.log(hi / lo))))
            o = int(torch.randint(1, output_len + 1, (), generator=gen))
        o = max(1, min(o, max_len - 2))
        p = max(1, min(p, max_len - o - 1))
        tail = torch.randint(3, high, (max(0, p - len(system)),), generator=gen).tolist()
        trace.append(((system + tail)[:p], o))
    return trace


def run_requests(
    engine: Any,
    trace: list[tuple[list[int], int]],
    samples: list[dict[str, float]] | None = None,
    every: int = 16,
    ttfts: list[float] | None = None,
) -> tuple[float, int, int]:
    """Submit every (prompt ids, output tokens) request at once (greedy, ignore EOS, no text)
    and step `engine` until idle; returns (seconds, output tokens, steps). With `samples`, the
    cache's `stats().as_dict()`, plus `running` (requests running), is appended every `every`
    steps. With `ttfts`, each request's seconds from submission to its first token are
    appended as it finishes."""
    from vattention import SamplingParams

    _sync()
    t0 = time.perf_counter()
    for ids, o in trace:
        p = SamplingParams(temperature=0, max_tokens=o, ignore_eos=True, detokenize=False)
        engine.add_request(ids, p)
    generated = steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated += len(out.token_ids)
            if ttfts is not None and out.metrics is not None and out.metrics.ttft is not None:
                ttfts.append(out.metrics.ttft)
        steps += 1
        if samples is not None and steps % every == 0 and hasattr(engine.cache, "stats"):
            sample = engine.cache.stats().as_dict()
            sample["running"] = float(engine.scheduler.num_running)
            samples.append(sample)
    _sync()
    return time.perf_counter() - t0, generated, steps


def run_bench(
    config: Any,
    trace_kind: str = "fixed",
    num_requests: int = 64,
    prompt_len: int = 128,
    output_len: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    from vattention.engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    try:
        vocab = engine.model_config.vocab_size
        trace = make_trace(
            trace_kind, num_requests, prompt_len, output_len, vocab, engine.max_model_len, seed
        )

        run_requests(engine, [(ids, min(o, 4)) for ids, o in trace[:4]])  # warm-up, excluded
        preempt0 = engine.scheduler.num_preemptions
        prefix = engine.scheduler.prefix
        hits0 = prefix.hit_tokens if prefix is not None else 0
        seconds, generated, steps = run_requests(engine, trace)
        prompt_tokens = sum(len(ids) for ids, _ in trace)
        cfg = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
        result = {
            "config": cfg,
            "trace": trace_kind,
            "requests": len(trace),
            "prompt_tokens": prompt_tokens,
            "output_tokens": generated,
            "seconds": seconds,
            "steps": steps,
            "output_tok_per_s": generated / seconds,
            "total_tok_per_s": (generated + prompt_tokens) / seconds,
            "preemptions": engine.scheduler.num_preemptions - preempt0,
            "prefix_hit_tokens": (prefix.hit_tokens - hits0) if prefix is not None else 0,
            "prefix_segments_built": getattr(engine.cache.stats(), "segments_built", None),
        }
    finally:
        engine.close()
    summary = (
        f"{config.model} ({config.kv_cache}), {trace_kind} trace: {len(trace)} requests, "
        f"{prompt_tokens} prompt + {generated} output tokens in {seconds:.2f} s: "
        f"{result['output_tok_per_s']:.1f} output tok/s, {result['total_tok_per_s']:.1f} total "
        f"tok/s, {steps} steps, {result['preemptions']} preemptions, "
        f"{result['prefix_hit_tokens']} prompt tokens from the prefix cache"
    )
    if result["prefix_segments_built"] is not None:
        summary += f", {result['prefix_segments_built']} prefix segments built"
    result["summary"] = summary
    del progress  # the run is a single timed loop; nothing to report while it runs
    return result


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
