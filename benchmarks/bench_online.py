"""Online serving: Poisson arrivals against `vattention serve`, TTFT / inter-token latency / throughput.

For each KV cache in `--caches` it starts `vattention serve MODEL --kv-cache C` (or uses
`--url` for a server already running), waits for `/health`, then for each rate in `--rates`
(requests per second) sends `--num-requests` streaming completions whose arrival times are a
seeded Poisson process, prompts of seeded random token ids (uniform lengths in
[--prompt-min, --prompt-max]) and `--output-len` tokens each (ignore_eos, greedy). Per request
it records TTFT (request sent -> first streamed token) and the gaps between streamed tokens
(tokens counted from per-token logprob entries, so tokens without text count too);
it reports p50/p99 of both, end-to-end latency, and output tokens per second over the run.
A short warm-up (excluded) precedes each rate.

    python benchmarks/bench_online.py --model llama-3-8b --load-format dummy --rates 2,8,32 \
        --caches vattention,paged --out benchmarks/results/online/llama-3-8b
    python benchmarks/bench_online.py --quick       # CPU smoke test on the tiny preset
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], out_len: int
) -> dict[str, Any]:
    """Stream one completion; time every token. Tokens are counted from the per-token logprob
    entries (`logprobs: 1`), not from text: a chunk whose tokens decode to no text yet (random
    weights, partial UTF-8) still carries them, and `usage` gives the total."""
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0,
            "stream": True, "ignore_eos": True, "logprobs": 1,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    stamps: list[float] = []  # one per token: its chunk's arrival
    itl: list[float] = []  # per token: the gap to the chunk before, shared by its tokens
    usage_tokens = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            if not chunk.get("choices"):
                continue
            lp = chunk["choices"][0].get("logprobs") or {}
            n = len(lp.get("tokens") or [])
            if n:
                if stamps:
                    itl += [(now - stamps[-1]) / n] * n
                stamps += [now] * n
    end = time.perf_counter()
    if not stamps:
        return {"error": "no tokens streamed"}
    return {
        "ttft": stamps[0] - t0,
        "itl": itl,
        "e2e": end - t0,
        "tokens": usage_tokens if usage_tokens is not None else len(stamps),
        "streamed_tokens": len(stamps),
    }


async def run_rate(
    url: str, model: str, rate: float, prompts: list[list[int]], out_len: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(one_request(client, url, model, p, 2) for p in prompts[:4]))
        tasks = []
        t0 = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(one_request(client, url, model, p, out_len)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    e2e = [r["e2e"] for r in ok]
    return {
        "rate": rate,
        "requests": len(prompts),
        "errors": [r["error"] for r in results if "error" in r][:5],
        "num_errors": len(results) - len(ok),
        "wall_s": wall,
        "output_tok_per_s": sum(r["tokens"] for r in ok) / wall,
        "output_tokens": sum(r["tokens"] for r in ok),
        "streamed_tokens": sum(r["streamed_tokens"] for r in ok),
        "ttft_p50_ms": 1e3 * _pct(ttft, 0.5),
        "ttft_p99_ms": 1e3 * _pct(ttft, 0.99),
        "itl_p50_ms": 1e3 * _pct(itl, 0.5),
        "itl_p99_ms": 1e3 * _pct(itl, 0.99),
        "e2e_mean_s": statistics.fmean(e2e) if e2e else float("nan"),
    }


def start_server(args: argparse.Namespace, cache: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "vattention.cli", "serve", args.model, "--port", str(port),
           "--kv-cache", cache, "--served-model-name", "bench", *args.server_args]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy in time")


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--url", default=None, help="an already running server (one cache)")
    ap.add_argument("--caches", default="vattention,paged")
    ap.add_argument("--rates", default="2,8,32")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--prompt-min", type=int, default=128)
    ap.add_argument("--prompt-max", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn below it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--quick", action="store_true", help="tiny preset on the CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("server_args", nargs="*", help="extra `vattention serve` flags after --")
    args = ap.parse_args()
    if args.quick:
        args.model, args.rates, args.num_requests = "tiny", "4", 8
        args.prompt_min, args.prompt_max, args.output_len, args.vocab = 4, 24, 4, 500
        args.server_args = ["--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
                            "--max-num-seqs", "8", "--kv-page-size", "65536",
                            "--max-model-len", "128", *args.server_args]  # fmt: skip
    rng = random.Random(args.seed)
    prompts = [
        [
            rng.randrange(10, args.vocab)
            for _ in range(rng.randint(args.prompt_min, args.prompt_max))
        ]
        for _ in range(args.num_requests)
    ]
    rates = [float(r) for r in args.rates.split(",")]
    info = {"python": platform.python_version(), "host": platform.node()}
    print("# bench_online")
    print("config:", json.dumps({k: v for k, v in vars(args).items() if k != "out"} | info))
    rows = []
    for cache in [None] if args.url else args.caches.split(","):
        proc, url = (None, args.url) if args.url else start_server(args, cache)
        try:
            for rate in rates:
                r = asyncio.run(run_rate(url, "bench" if proc else args.model, rate, prompts,
                                         args.output_len, args.seed))  # fmt: skip
                r["cache"] = cache or "server at --url"
                rows.append(r)
                print(json.dumps(r), flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    lines = [
        "| cache | rate (req/s) | out tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cache']} | {r['rate']:g} | {r['output_tok_per_s']:.0f} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
            f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['num_errors']} |"
        )
    md = f"# Online serving, {args.model}\n\nCommand: `{' '.join(sys.argv)}`\n\n" + "\n".join(lines)
    print("\n" + md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
