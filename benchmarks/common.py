"""Helpers shared by the benchmarks: timing, the device/versions banner, tables, result files.

- `time_ms(fn)`: median milliseconds of `fn()` with warm-up excluded. On CUDA it is
  `triton.testing.do_bench` (CUDA events, L2 flushed before every call, median), else CUDA
  events by hand; on the CPU `time.perf_counter` around each call.
- `copy_bandwidth(device)`: device-to-device copy rate, bytes read plus written per second: the
  ceiling that decode-attention bandwidth is compared with.
- `banner(device)`: what the results were measured on (device, memory, SMs, library versions).
- `markdown_table` / `print_table`: one formatting for the console and the `.md` file.
Nothing here imports vattention, so any benchmark can use it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_reps: int = 3,
) -> float:
    """Median time of one `fn()` call in milliseconds, warm-up excluded."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_events_ms(fn, dev, warmup_ms, rep_ms)
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (compilation, caches)
    samples = []
    for _ in range(max(1, cpu_reps)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _cuda_events_ms(
    fn: Callable[[], object], dev: torch.device, warmup_ms: float, rep_ms: float
) -> float:
    fn()
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(dev)
    once = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / once))):
        fn()
    samples = []
    for _ in range(max(3, int(rep_ms / once))):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(dev)
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30) -> dict[str, float]:
    """Device-to-device copy of `nbytes`: returns bytes and (read + written) bytes per second."""
    dev = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), dev, rep_ms=200.0)
    return {"bytes": float(nbytes), "ms": ms, "bytes_per_s": 2 * nbytes / (ms * 1e-3)}


def banner(device: torch.device | str) -> dict[str, str]:
    dev = torch.device(device)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["device"] = props.name
        info["gpu_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
        info["sms"] = str(props.multi_processor_count)
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    print(f"\n## {title}\n{markdown_table(rows, columns)}", flush=True)


def write_results(out: str | Path, results: dict[str, Any], markdown: str) -> list[Path]:
    """Write `results.json` and `results.md` under `out` (created); returns the paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "results.json", folder / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths[1].write_text(markdown + "\n")
    return paths
