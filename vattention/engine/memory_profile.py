"""Start-up memory profile: what the engine's steps need beside the KV cache (vLLM's profile run).

Before the real KV cache exists, `profile_memory` builds a small temporary cache of the same
kind (`VirtualKVCache` or `PagedKVCache`: the same spec but fewer slots, a budget just big
enough for the profile's tokens, nothing preallocated), the same attention backend over it,
and runs the largest steps the scheduler can produce through the real code path (`Scheduler`
-> `ModelRunner.execute`: model forward, `compute_logits`, sampler):
  (a) the step's token budget as fresh prefill: prompts of up to `max_model_len - 1` tokens;
  (b) `min(max_num_seqs, budget)` requests sharing the budget, so the sampler sees
      `max_num_seqs` rows, all sampling with top-k, top-p, min-p and 20 log-probabilities (the
      sampler's most memory-hungry path: a sort of the vocabulary per row).
What it measures, on CUDA (on the CPU the steps run, and measure 0):
- `step_peak`: the most device memory a step takes above what was allocated before it (torch's
  peak allocated or reserved bytes, whichever grew more, so allocator rounding counts). The
  baseline is taken once the temporary cache exists, so its paged pools (which torch allocates)
  are not counted; the vAttention cache's pages come from the driver, never from torch;
- `graph_reserve`: CUDA graphs are captured after the KV cache exists and keep their memory
  pool for the whole run. Reserved: the peak of one step of the largest graph's token count
  (the largest capture's working set, which smaller captures reuse) plus the logits every graph
  keeps as its output (float32, `[rows, vocab]` per graph; these are never reused);
- `in_use`: `total - free` once the profile is over (its cache closed, torch's cache emptied):
  weights, the CUDA context, kernels the profile loaded, and other processes' memory.
Then `kv_budget = total * gpu_memory_utilization - in_use - step_peak - graph_reserve - margin`
(`margin`: a fixed 256 MiB for the CUDA context's growth and fragmentation); a budget <= 0 is a
`ValueError` naming each figure and the options to change.

Invariants: the temporary cache is closed (and its memory given back) whatever happens; every
profile request ends within its step (one output token), so no slot, page or block is held
when the steps return; the engine's own sampler is not used (its seeded generator is unmoved).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vattention.attention import AttentionBackend, create_backend
from vattention.engine.model_runner import ModelRunner
from vattention.engine.request import Request
from vattention.engine.sampler import Sampler
from vattention.engine.sampling_params import SamplingParams
from vattention.engine.scheduler import Scheduler
from vattention.engine.scheduling import SchedulerConfig
from vattention.kvcache.spec import KVCacheSpec
from vattention.models.llama import LlamaForCausalLM

GiB = 1 << 30
MARGIN = 256 << 20  # CUDA context growth and allocator fragmentation over a long run
LOGITS_BYTES = 4  # graphs keep float32 logits (`compute_logits` returns float32)
# Every sampler filter at once, plus log-probabilities (the server's most, 20).
PROFILE_PARAMS = SamplingParams(
    temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, logprobs=20, max_tokens=1,
    ignore_eos=True, detokenize=False,
)  # fmt: skip


@dataclass(frozen=True)
class MemoryProfile:
    """The figures the KV budget was sized from (bytes; see the module docstring)."""

    total: int  # the device's memory
    in_use: int  # total - free after the weights and the profile, before the KV cache
    step_peak: int  # largest step's transient memory
    graph_reserve: int  # CUDA graphs' pool (0 without graphs)
    margin: int
    utilization: float  # gpu_memory_utilization
    kv_budget: int

    def as_dict(self) -> dict[str, float]:
        return dict(dataclasses.asdict(self))

    def describe(self) -> str:
        g = {k: v / GiB for k, v in self.as_dict().items() if k != "utilization"}
        return (
            f"KV budget {g['kv_budget']:.2f} GiB = {self.utilization:g} x {g['total']:.2f} GiB "
            f"total - {g['in_use']:.2f} in use - {g['step_peak']:.2f} step peak - "
            f"{g['graph_reserve']:.2f} CUDA graphs - {g['margin']:.2f} margin"
        )


def kv_budget(
    total: int,
    in_use: int,
    step_peak: int,
    graph_reserve: int,
    utilization: float,
    margin: int = MARGIN,
) -> MemoryProfile:
    """The KV budget from the measured figures; `ValueError` when nothing is left for it."""
    budget = int(total * utilization) - in_use - step_peak - graph_reserve - margin
    profile = MemoryProfile(total, in_use, step_peak, graph_reserve, margin, utilization, budget)
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache: {profile.describe()} "
            f"(in use counts the weights, the CUDA context and other processes). Raise "
            f"gpu_memory_utilization, lower max_num_batched_tokens or max_num_seqs (smaller "
            f"steps), set enforce_eager (no CUDA graphs), or give kv_cache_memory in bytes."
        )
    return profile


def prefill_lengths(tokens: int, max_seqs: int, max_prompt: int) -> list[int]:
    """Step (a): prompts of up to `max_prompt` tokens summing to `tokens` (at most `max_seqs`
    of them; fewer tokens if even that many cannot hold them)."""
    out: list[int] = []
    while tokens > 0 and len(out) < max_seqs:
        n = min(tokens, max_prompt)
        out.append(n)
        tokens -= n
    return out


def shared_lengths(tokens: int, rows: int, max_prompt: int) -> list[int]:
    """Step (b): `min(rows, tokens)` prompts sharing `tokens` as evenly as possible (each of
    at most `max_prompt` tokens)."""
    rows = min(rows, tokens)
    base, extra = divmod(tokens, rows)
    return [min(max_prompt, base + (i < extra)) for i in range(rows)]


def profile_steps(config: SchedulerConfig) -> list[list[int]]:
    """Prompt lengths of each profile step: (a) and (b) of the module docstring."""
    budget, seqs = config.max_num_batched_tokens, config.max_num_seqs
    top = config.max_model_len - 1
    steps = [prefill_lengths(budget, seqs, top), shared_lengths(budget, seqs, top)]
    return steps if steps[0] != steps[1] else steps[:1]


def graph_outputs_bytes(
    decode_sizes: Sequence[int], mixed_sizes: Sequence[int], max_num_seqs: int, vocab: int
) -> int:
    """Bytes of the logits the CUDA graphs keep: a decode graph of b rows keeps `[b, vocab]`,
    a mixed graph `[min(b, max_num_seqs), vocab]` (its sampling rows)."""
    rows = sum(decode_sizes) + sum(min(b, max_num_seqs) for b in mixed_sizes)
    return rows * vocab * LOGITS_BYTES


def profile_cache(
    kind: str, spec: KVCacheSpec, device: torch.device, block_size: int, steps: list[list[int]]
) -> Any:
    """A temporary cache of `kind` like `spec` with as many slots as the largest step has
    requests and a budget just big enough for any one step's prompts (steps run one at a time,
    each freeing its slots); nothing preallocated. The caller closes it."""
    spec = dataclasses.replace(spec, max_slots=max(len(s) for s in steps))
    if kind == "paged":
        from vattention.kvcache.paged import PagedKVCache

        blocks = max(sum(-(-n // block_size) for n in s) for s in steps)
        budget = blocks * block_size * spec.token_bytes
        return PagedKVCache(spec, block_size=block_size, budget_bytes=budget, device=device)
    if kind != "vattention":
        raise ValueError(f"unknown KV cache kind {kind!r}")
    from vattention.kvcache.layout import CacheLayout
    from vattention.kvcache.virtual import VirtualKVCache
    from vattention.memory.backend import make_backend

    # The cache's own backend kind; built here only to learn its page size first.
    backend = make_backend("cuda" if device.type == "cuda" else "cpu", spec.page_size, device)
    try:
        layout = CacheLayout(spec, backend.page_size)
        pages = max(sum(layout.pages_for(n) for n in s) for s in steps) * layout.num_buffers
    finally:
        backend.close()
    return VirtualKVCache(
        spec, "cuda" if device.type == "cuda" else "cpu", device=device,
        budget_bytes=pages * layout.page_size, lookahead_tokens=0, mapping="inline",
    )  # fmt: skip


def run_profile_steps(
    model: LlamaForCausalLM,
    cache: Any,
    attention_backend: str,
    config: SchedulerConfig,
    steps: list[list[int]],
    device: torch.device,
) -> list[int]:
    """Run each step (prompt lengths) through a `Scheduler` and an eager `ModelRunner` over
    `cache` and a new `attention_backend`; returns each step's peak device memory (0 on the
    CPU). Every request ends within its step (`max_tokens=1`), so the cache holds nothing
    afterwards, and nothing made here outlives the call."""
    attn = _backend(model, cache, attention_backend)
    runner = ModelRunner(model, cache, attn, Sampler(seed=0), device, config.max_model_len)
    peaks: list[int] = []
    for i, lengths in enumerate(steps):
        scheduler = Scheduler(config, cache)
        for j, n in enumerate(lengths):
            scheduler.add_request(Request(f"profile-{i}-{j}", [0] * n, PROFILE_PARAMS))
        peaks.append(_measure(device, functools.partial(_step, scheduler, runner, sum(lengths))))
    return peaks


def _step(scheduler: Scheduler, runner: ModelRunner, tokens: int) -> None:
    """One step admitting every waiting request (`tokens` in all), run to its sampled ids."""
    out = scheduler.schedule()
    if out.num_batched_tokens != tokens or out.preempted or out.finished:
        raise RuntimeError(
            f"the memory profile's step scheduled {out.num_batched_tokens} of {tokens} tokens: "
            f"its temporary KV cache could not back them all (is the device short of memory?)"
        )
    finished = scheduler.update(out, runner.execute(out).token_ids())
    if len(finished) != len(out.scheduled) or scheduler.has_unfinished_requests():
        raise RuntimeError("a profile request outlived its step")


def _backend(model: LlamaForCausalLM, cache: Any, name: str) -> AttentionBackend:
    c = model.config
    return create_backend(name, cache, c.num_heads, c.num_kv_heads, c.head_dim)


def _graphs_ok(model: LlamaForCausalLM, cache: Any, name: str) -> tuple[bool, bool]:
    """Whether the runner would capture (decode, mixed) graphs with this backend over this
    cache kind (`ModelRunner`'s rule)."""
    attn = _backend(model, cache, name)
    return attn.supports_decode_graphs, bool(getattr(attn, "mixed_graph_block_m", None))


def _measure(device: torch.device, fn: Callable[[], None]) -> int:
    """Run `fn`; on CUDA return the most memory it took beyond what was held before it."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    allocated = torch.cuda.memory_allocated(device)
    reserved = torch.cuda.memory_reserved(device)
    fn()
    torch.cuda.synchronize(device)
    return max(
        torch.cuda.max_memory_allocated(device) - allocated,
        torch.cuda.max_memory_reserved(device) - reserved,
    )


def _mem_info(device: torch.device) -> tuple[int, int]:
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def profile_memory(
    model: LlamaForCausalLM,
    *,
    kind: str,
    spec: KVCacheSpec,
    device: torch.device,
    attention_backend: str,
    block_size: int,
    scheduler_config: SchedulerConfig,
    utilization: float,
    decode_graph_sizes: Sequence[int] = (),
    mixed_graph_sizes: Sequence[int] = (),
    mem_info: Callable[[torch.device], tuple[int, int]] = _mem_info,
) -> MemoryProfile:
    """Measure the steps' memory on a temporary cache and size the KV budget (module
    docstring). Graph sizes: those the engine will capture (empty: no CUDA graphs); each
    kind counts only where the attention backend can run it. `mem_info(device)` gives
    `(free, total)` bytes (tests pass their own)."""
    sched = scheduler_config
    steps = profile_steps(sched)
    top = sched.max_model_len - 1

    def graph_step(sizes: Sequence[int]) -> list[int]:
        """The largest capture's working set, as an eager step of as many tokens."""
        tokens = min(max(sizes, default=0), sched.max_num_batched_tokens)
        return shared_lengths(tokens, sched.max_num_seqs, top) if tokens else []

    graph = graph_step([*decode_graph_sizes, *mixed_graph_sizes])
    cache = profile_cache(kind, spec, device, block_size, steps + [graph] * bool(graph))
    try:
        decode_ok, mixed_ok = _graphs_ok(model, cache, attention_backend)
        if not (decode_ok and mixed_ok):  # the runner captures only what the backend can run
            decode_graph_sizes = decode_graph_sizes if decode_ok else ()
            mixed_graph_sizes = mixed_graph_sizes if mixed_ok else ()
            graph = graph_step([*decode_graph_sizes, *mixed_graph_sizes])
        try:
            peaks = run_profile_steps(
                model, cache, attention_backend, sched, steps + [graph] * bool(graph), device
            )
        except torch.OutOfMemoryError as err:
            raise ValueError(
                f"the start-up memory profile ran out of device memory in a step of "
                f"{sched.max_num_batched_tokens} tokens and up to {sched.max_num_seqs} "
                f"sequences: lower max_num_batched_tokens or max_num_seqs"
            ) from err
    finally:  # nothing else holds the cache's tensors: its memory goes back now
        cache.close()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    graph_reserve = 0
    if graph:
        kept = graph_outputs_bytes(
            decode_graph_sizes, mixed_graph_sizes, sched.max_num_seqs, model.config.vocab_size
        )
        graph_reserve = peaks[-1] + kept
    free, total = mem_info(device)
    return kv_budget(total, total - free, max(peaks[: len(steps)]), graph_reserve, utilization)
