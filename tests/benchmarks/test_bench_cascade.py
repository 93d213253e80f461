"""`bench_cascade.py --quick`: both real caches hold one shared prompt, and the cascade kernel's
output matches plain decoding (the benchmark checks it before timing) on each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_cascade_quick_checks_both_caches(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_cascade.py"), "--quick",
           "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["cache"] for r in rows} == {"vattention", "paged"}
    for r in rows:
        assert r["max_abs_diff"] < 1e-4 and r["plain_ms"] > 0 and r["cascade_ms"] > 0
    assert "cascade_ms" in (tmp_path / "results.md").read_text()
