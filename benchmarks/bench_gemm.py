"""The model's matmuls alone: what cuBLAS gives on this GPU for a preset's prefill GEMM shapes.

The fixed serving trace is GEMM-bound (issue 9: 73% of kernel time is cuBLAS); this measures
the same shapes outside the engine (`x [M, K] @ W[N, K]^T`, bf16, as `nn.Linear` runs them),
so the engine's figure can be read against what the library reaches alone. Prints the
configuration, then per shape: milliseconds, TFLOP/s and the share of the dense bf16 peak
(`--peak-tflops`, default the H100/H200 SXM figure, 989). Warm-up calls are excluded.
`--sustain-s S` then runs the largest gate/up GEMM back to back for S seconds and prints
TFLOP/s and the SM clock (nvidia-smi, read while the GPU works) per window: whether the rate
holds under sustained load, as it must in a prefill-bound serving trace.

    python benchmarks/bench_gemm.py --model llama-3-8b --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vattention.models.presets import get_preset  # noqa: E402


def shapes(model: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each linear layer of one decoder layer (fused as the engine fuses)."""
    c = get_preset(model)
    return {
        "qkv_proj": (c.q_size + 2 * c.kv_size, c.hidden_size),
        "o_proj": (c.hidden_size, c.q_size),
        "gate_up_proj": (2 * c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
    }


def time_ms(fn: object, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()  # type: ignore[operator]
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def sm_clock_mhz() -> float | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")[torch.cuda.current_device()]
        return float(out.split(",")[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def sustain(args: argparse.Namespace, m: int) -> list[dict[str, float | None]]:
    """The gate/up GEMM back to back for `args.sustain_s` seconds, in windows of 50 calls."""
    n, k = shapes(args.model)["gate_up_proj"]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    windows: list[dict[str, float | None]] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.sustain_s:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            torch.nn.functional.linear(x, w)
        end.record()
        clock = sm_clock_mhz()  # read while the window runs
        end.synchronize()
        ms = start.elapsed_time(end) / 50
        win = {"t_s": time.perf_counter() - t0, "tflops": 2 * m * n * k / ms / 1e9, "sm_mhz": clock}
        windows.append(win)
        print(f"sustained M={m} gate_up t={win['t_s']:5.2f}s {win['tflops']:7.1f} TFLOP/s "
              f"SM {clock} MHz")  # fmt: skip
    return windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 8192, 256, 64])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--sustain-s", type=float, default=0.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemm needs a CUDA GPU")
    config = vars(args) | {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print("config:", json.dumps(config))
    rows = []
    for m in args.tokens:
        for name, (n, k) in shapes(args.model).items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            ms = time_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w), args.iters)
            tflops = 2 * m * n * k / ms / 1e9
            row = {"tokens": m, "layer": name, "n": n, "k": k, "ms": ms, "tflops": tflops}
            row["peak_share"] = tflops / args.peak_tflops
            rows.append(row)
            print(
                f"M={m:6d} {name:13s} N={n:6d} K={k:6d} {ms:8.3f} ms {tflops:7.1f} TFLOP/s "
                f"({row['peak_share']:.0%} of peak)"
            )
            del x, w
    sustained = sustain(args, max(args.tokens)) if args.sustain_s > 0 else []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"config": config, "rows": rows, "sustained": sustained}, f, indent=1)


if __name__ == "__main__":
    main()
