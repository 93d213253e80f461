"""Prometheus metrics of one app, in a private `CollectorRegistry` (several apps per process
never share or clash).

Two kinds of figures:
- request metrics, updated by the HTTP layer as outputs reach it (event-loop thread only):
  prompt and generation token counters, successes by finish reason, errors by HTTP status,
  time to first token, inter-token latency and end-to-end latency histograms;
- engine and KV-cache metrics, read from one `EngineSnapshot` taken on the engine thread at
  scrape time (`render(snapshot)`): requests running / waiting, preemptions, steps, and every
  numeric field of `cache.stats()` as `vattention_kv_<field>` (gauges; the cumulative
  `*_calls` fields are counters, `vattention_kv_<field>_total`). So, on an idle engine, the
  KV figures of a scrape equal `engine.cache.stats()` exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vattention.server.async_engine import EngineSnapshot

PREFIX = "vattention_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Help texts of the KV stats fields of both caches (`KVCacheStats` and `PagedStats`).
KV_HELP = {
    "page_size": "Physical page size in bytes (vAttention cache)",
    "budget_bytes": "Most physical KV bytes the cache may create (vAttention cache)",
    "created_bytes": "Physical KV pages that exist, mapped or pooled, in bytes",
    "mapped_bytes": "Physical KV bytes mapped into slots, used or free",
    "live_bytes": "KV bytes holding the live tokens of running requests",
    "used_mapped_bytes": "KV bytes mapped into slots of running requests",
    "reclaimable_bytes": "KV bytes still mapped in free slots (deferred reclamation, reusable)",
    "pool_free_bytes": "Created KV pages mapped nowhere (the free pool), in bytes",
    "slots_used": "KV slots held by running requests",
    "slots_free": "KV slots free",
    "map_calls": "Page map calls made by the KV cache",
    "blocking_map_calls": "Page map calls a step had to wait for (not done ahead)",
    "unmap_calls": "Page unmap calls made by the KV cache",
    "set_access_calls": "Set-access calls made by the KV cache",
    "create_calls": "Physical page creations",
    "destroy_calls": "Physical page destructions",
    "internal_fragmentation": "Share of the running requests' KV bytes holding no live token",
    "block_size": "Tokens per KV block (paged cache)",
    "block_bytes": "Bytes per KV block, K and V of all layers (paged cache)",
    "num_blocks": "Usable KV blocks (paged cache)",
    "free_blocks": "KV blocks free (paged cache)",
    "used_blocks": "KV blocks held by running requests (paged cache)",
    "allocated_bytes": "KV bytes allocated up front (paged cache)",
    "used_bytes": "KV bytes in blocks held by running requests (paged cache)",
    "live_tokens": "Live tokens of running requests in the KV cache",
    "slack_bytes": "Unused tails of the pages running requests' live tokens need",
    "lookahead_bytes": "KV bytes mapped ahead of running requests (the first to be reclaimed)",
    "prepared_bytes": "Free slots' KV bytes mapped ahead for the requests expected next",
    "prefix_bytes": "Physical KV bytes of cached prefix pages (shared without copies)",
    "prefix_idle_bytes": "Cached prefix KV bytes no request maps (evicted when memory is short)",
    "shared_saved_bytes": "Physical KV bytes saved by mapping shared prefix pages, not copying",
    "prefix_hit_pages": "Cached prefix pages mapped into admitted requests so far",
    "segment_bytes": "KV bytes of hot prefixes moved into one allocation each (mapped whole)",
}

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def kv_metric(field: str) -> tuple[str, str]:
    """(sample name, type) under which the KV stats `field` is exposed."""
    if field.endswith("_calls"):
        return f"{PREFIX}kv_{field}_total", "counter"
    return f"{PREFIX}kv_{field}", "gauge"


class _EngineCollector(Collector):
    """Yields the figures of the snapshot handed to it just before a scrape."""

    def __init__(self) -> None:
        self.snapshot: EngineSnapshot | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        if s is None:
            return
        yield _gauge("num_requests_running", "Requests holding a KV slot", s.num_running)
        yield _gauge("num_requests_waiting", "Requests queued for admission", s.num_waiting)
        yield _counter("num_preemptions", "Requests preempted (KV memory)", s.num_preemptions)
        yield _counter("engine_steps", "Engine steps run", s.num_steps)
        yield _counter("engine_step_errors", "Engine steps that failed", s.num_step_errors)
        yield _counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
            s.prefix_query_tokens,
        )  # fmt: skip
        yield _counter(
            "prefix_cache_hits", "Prompt tokens served from cached KV pages (not computed)",
            s.prefix_hit_tokens,
        )  # fmt: skip
        yield _counter(
            "cascade_decode_steps",
            "Decode steps that attended a prefix shared by their requests once (cascade)",
            s.cascade_steps,
        )
        info = GaugeMetricFamily(f"{PREFIX}kv_cache_info", "The KV cache kind", labels=["kind"])
        info.add_metric([s.kv_cache], 1.0)
        yield info
        for field, value in s.kv_stats.items():
            help_text = KV_HELP.get(field, f"KV cache stats field {field}")
            name, kind = kv_metric(field)
            family: CounterMetricFamily | GaugeMetricFamily
            if kind == "counter":
                family = CounterMetricFamily(name.removesuffix("_total"), help_text)
            else:
                family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        page = s.kv_stats.get("page_size")
        if page and "pool_free_bytes" in s.kv_stats:
            pages = s.kv_stats["pool_free_bytes"] / page
            yield _gauge("kv_pool_free_pages", "Created KV pages in the free pool", pages)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, help_text, value=float(value))


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, help_text, value=float(value))


class ServerMetrics:
    """The app's registry and the request metrics; see the module docstring."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.prompt_tokens = Counter(
            f"{PREFIX}prompt_tokens", "Prompt tokens of admitted requests", registry=reg
        )
        self.generation_tokens = Counter(
            f"{PREFIX}generation_tokens", "Tokens generated", registry=reg
        )
        self.request_success = Counter(
            f"{PREFIX}request_success",
            "Requests that finished, by finish reason",
            ["finished_reason"],
            registry=reg,
        )
        self.request_errors = Counter(
            f"{PREFIX}request_errors", "Requests answered with an error, by status", ["status"],
            registry=reg,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Seconds from arrival to the first generated token",
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Seconds between generated tokens of a request",
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "Seconds from arrival to the last token",
            buckets=E2E_BUCKETS,
            registry=reg,
        )
        self._engine = _EngineCollector()
        reg.register(self._engine)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)

    def render(self, snapshot: EngineSnapshot | None) -> bytes:
        """The exposition text, with the engine figures of `snapshot`."""
        self._engine.snapshot = snapshot
        try:
            return generate_latest(self.registry)
        finally:
            self._engine.snapshot = None


class RequestTracker:
    """One request's timings and token counts, fed with each cumulative output."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self._last: float | None = None
        self._tokens = 0
        self._done = False

    @property
    def done(self) -> bool:
        """Whether the request's end was recorded."""
        return self._done

    def observe(self, num_prompt_tokens: int, num_tokens: int, finish_reason: str | None) -> None:
        """The request now has `num_tokens` output tokens (and ended if `finish_reason`)."""
        if self._done:
            return
        m, now = self.metrics, time.monotonic()
        new = num_tokens - self._tokens
        if new > 0:
            if self._last is None:  # the first output: prefill done
                m.ttft.observe(now - self.arrival)
                m.prompt_tokens.inc(num_prompt_tokens)
            else:  # tokens that arrive together share the gap since the last output
                gap = (now - self._last) / new
                for _ in range(new):
                    m.itl.observe(gap)
            m.generation_tokens.inc(new)
            self._tokens, self._last = num_tokens, now
        if finish_reason is not None:
            self._done = True
            if self._last is None:  # ended without a token: count its prompt all the same
                m.prompt_tokens.inc(num_prompt_tokens)
            m.e2e.observe(now - self.arrival)
            m.request_success.labels(finished_reason=finish_reason).inc()
