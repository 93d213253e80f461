"""`benchmarks/bench_attention.py --quick` runs end to end on the CPU (Triton interpreter) and
writes results whose every backend that can run here agrees with the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_writes_consistent_results(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--quick",
           "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "copy bandwidth" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert {r["phase"] for r in rows} == {"decode", "prefill", "chunked_prefill", "layout"}
    ran = {r["backend"] for r in rows if "ms" in r}
    assert {"triton_decode", "sdpa", "paged_triton/16", "paged_flex/16"} <= ran
    assert all("error" not in r for r in rows if r["backend"].startswith("paged"))
    assert max(r.get("rel_err", 0.0) for r in rows) < 1e-4
    for r in rows:
        if r["phase"] in ("decode", "layout") and "ms" in r:
            assert r["tb_s"] > 0 and r["copy_frac"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "## Decode: tiny" in md and "## Prefill" in md and "paged_triton/16" in md
