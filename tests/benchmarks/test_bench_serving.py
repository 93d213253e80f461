"""The benchmarks run end to end on the CPU (`--quick`) and write their results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_serving_quick_writes_both_systems(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--quick",
           "--trace", "uneven", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    data = json.loads((tmp_path / "results.json").read_text())
    systems = {r["kv_cache"]: r for r in data["results"]}
    assert set(systems) == {"vattention", "paged"}
    for r in systems.values():
        assert "error" not in r, r
        assert r["output_tokens"] == data["trace"]["output_tokens"]
        assert r["memory"]["held_over_live_mean"] >= 1.0
    assert "vattention / paged" in (tmp_path / "results.md").read_text()


def test_bench_serving_multi_turn_profiles_fresh_conversations(tmp_path: Path) -> None:
    """The GPU-busy profile's code path (on the CPU it records no kernels): for multi-turn it
    runs fresh conversations, so its work is not the timed run's and no timed share is given."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--quick",
           "--trace", "multi-turn", "--turns", "2", "--num-requests", "4",
           "--systems", "vattention+prefix", "--busy-fraction", "0.5", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (r,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "error" not in r, r
    gpu = r["gpu"]
    assert gpu["requests"] == 2 and gpu["steps"] > 0 and gpu["wall_s"] > 0
    assert "busy_share_timed" not in gpu and gpu["kernel_s"] == 0.0


def test_bench_online_quick_serves_both_caches(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_online.py"), "--quick",
           "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["cache"] for r in rows} == {"vattention", "paged"}
    for r in rows:
        assert r["num_errors"] == 0 and r["output_tok_per_s"] > 0
        assert r["ttft_p50_ms"] > 0 and r["itl_p50_ms"] > 0
        # every generated token was seen in the stream (counted from logprobs, not text)
        assert r["output_tokens"] == r["streamed_tokens"] == r["requests"] * 4


@pytest.mark.parametrize("trace", ["shared-prefix", "multi-turn"])
def test_bench_serving_prefix_traces_hit_the_cache(tmp_path: Path, trace: str) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--quick",
           "--trace", trace, "--turns", "2", "--systems", "vattention+prefix,paged+prefix",
           "--opt", "kv_page_size=4096", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    data = json.loads((tmp_path / "results.json").read_text())
    for r in data["results"]:
        assert "error" not in r, r
        assert r["prefix_hit_tokens"] > 0, r["kv_cache"]
    assert "vattention+prefix / paged+prefix" in (tmp_path / "results.md").read_text()


def test_system_names_pick_cache_sharing_and_layout() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_serving import parse_system
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert parse_system("vattention") == ("vattention", False, None)
    assert parse_system("paged+prefix") == ("paged", True, None)
    assert parse_system("vattention+prefix@cross_layer_kv") == (
        "vattention",
        True,
        "cross_layer_kv",
    )
    assert parse_system("vattention+prefix-noseg") == ("vattention", True, None)
    for bad in ("vatt", "paged@cross_layer", "vattention+share", "paged+prefix-noseg"):
        with pytest.raises(ValueError, match="system"):
            parse_system(bad)


def test_bench_memory_quick_times_decode_and_prefill_shaped_steps(tmp_path: Path) -> None:
    """Every mapping mode is timed for decode steps and for prefill-shaped eager steps (the
    steps the engine runs without a graph), each of which maps new pages."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--quick",
           "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = json.loads((tmp_path / "results.json").read_text())["step"]
    prefill = [r for r in rows if "chunks" in r["launch"]]
    assert len(prefill) == 1 and len(rows) > 1
    for r in rows:
        for mode in ("premapped", "sync", "async", "async_bursts", "inline"):
            assert r[f"{mode}_ms"] > 0
        assert r["map_calls_per_step"] > 0
    assert "chunks" in (tmp_path / "results.md").read_text()


def test_idle_gaps_merge_overlaps_and_classify() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_engine import idle_gaps

    assert idle_gaps([])["idle_s"] == 0.0
    kernels = [  # (start us, end us, name), out of order; b and c overlap (two streams)
        (0.0, 10.0, "a"), (15.0, 40.0, "b"), (20.0, 30.0, "c"), (5_040.0, 5_050.0, "d"),
        (5_100.0, 5_110.0, "e"),
    ]  # fmt: skip
    got = idle_gaps(kernels, top=2)
    assert got["idle_s"] == pytest.approx((5 + 5_000 + 50) / 1e6)
    assert got["span_s"] == pytest.approx(5_110 / 1e6)
    assert got["gaps_by_size"]["<20us"] == [1, pytest.approx(5e-6)]
    assert got["gaps_by_size"]["<100us"] == [1, pytest.approx(50e-6)]
    assert got["gaps_by_size"]["<10000us"] == [1, pytest.approx(5e-3)]
    assert got["gaps_by_size"][">=10000us"] == [0, 0.0]
    assert got["largest"][0] == {"ms": 5.0, "after": "b", "before": "d"}  # b ends last at 40
    assert [g["before"] for g in got["largest"]] == ["d", "e"]


def test_warmup_trace_adds_shifted_full_steps() -> None:
    """After the length-range sample come the trace's first requests with ids shifted by one
    (nothing the timed run could hit in the prefix cache; shared prefixes stay shared among
    them), up to four steps' prompt tokens or max_num_seqs requests, outputs capped."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_serving import warmup_trace

    prefix = [5, 6, 7]
    trace = [(prefix + [i, 9], 100) for i in range(20)]
    plain = warmup_trace(trace, quick=False)
    assert len(plain) == 8 and all(o == 16 for _, o in plain)
    warm = warmup_trace(trace, quick=False, step_tokens=5, max_seqs=10, vocab=10)
    extra = warm[8:]
    assert len(extra) == 4  # 4 steps of 5 tokens: four prompts of 5
    assert [ids for ids, _ in extra] == [[6, 7, 8, (i + 1) % 10, 0] for i in range(4)]
    assert not {tuple(ids) for ids, _ in extra} & {tuple(ids) for ids, _ in trace}
    assert len(warmup_trace(trace, quick=True, step_tokens=100, max_seqs=3, vocab=10)) == 11
