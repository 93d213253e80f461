"""Prefix caching behind the server: a repeated prompt is served from cached pages, the same
completion comes back, and `/metrics` counts the prompt tokens looked up and hit."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL, engine_config, idle, serving, wait_until
from vattention.server.async_engine import AsyncEngine


def _values(text: str) -> dict[str, float]:
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_repeated_prompt_hits_the_prefix_cache(model_dir: Path) -> None:
    config = engine_config(model_dir, enable_prefix_caching=True, kv_page_size=4096)
    engine = AsyncEngine.from_config(config)
    prompt = list(range(5, 5 + 90))  # 90 tokens: 22 full pages of 4 tokens before the last
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    with serving(engine) as running:
        first = httpx.post(running.base_url + "/completions", json=body, timeout=30).json()
        wait_until(lambda: idle(engine), what="the first request to finish")
        second = httpx.post(running.base_url + "/completions", json=body, timeout=30).json()
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        values = _values(httpx.get(running.url + "/metrics").text)
    assert values["vattention_prefix_cache_queries_total"] == 2 * len(prompt)
    assert values["vattention_prefix_cache_hits_total"] == (len(prompt) - 1) // 4 * 4
    assert values["vattention_kv_prefix_bytes"] > 0
    # one request at a time shares with no other, and the CPU's decode kernel has no cascade
    assert values["vattention_cascade_decode_steps_total"] == 0


def test_engine_snapshot_figures_render_as_metrics() -> None:
    """Every engine figure of a snapshot reaches `/metrics` under its name, counters with
    `_total`, the cascade decode steps among them."""
    from vattention.server.async_engine import EngineSnapshot
    from vattention.server.metrics import ServerMetrics

    snap = EngineSnapshot(
        num_running=3, num_waiting=2, num_preemptions=1, kv_stats={"map_calls": 9.0},
        kv_cache="vattention", num_steps=40, num_step_errors=0, prefix_query_tokens=100,
        prefix_hit_tokens=64, cascade_steps=7,
    )  # fmt: skip
    values = _values(ServerMetrics().render(snap).decode())
    assert values["vattention_cascade_decode_steps_total"] == 7
    assert values["vattention_engine_steps_total"] == 40
    assert values["vattention_prefix_cache_hits_total"] == 64
    assert values["vattention_num_requests_waiting"] == 2
    assert values["vattention_kv_map_calls_total"] == 9
