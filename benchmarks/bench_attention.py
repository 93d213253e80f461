"""Attention kernels on a contiguous KV cache vs the PagedAttention baseline, side by side.

    python benchmarks/bench_attention.py --out benchmarks/results/attention
    python benchmarks/bench_attention.py --quick     # CPU smoke test (tiny shapes, interpreter)

Decode: one new token per request over uneven context lengths (uniform in [L/2, L]); achieved
bandwidth = bytes of K and V read / time, and its fraction of the copy bandwidth measured first
(bytes read + written / time of a large device copy). Prefill: one fresh prompt of S tokens
(causal FLOPs = 2 * S^2 * Hq * D) and a chunked-prefill step (4096 new queries over S - 4096
cached tokens; FLOPs = 4 * C * Hq * D * (S - C / 2)). Contiguous kernels read the cache in place;
paged kernels read block pools through block tables. Times are medians of
`triton.testing.do_bench` (warm-up excluded); one layer's cache per case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--quick" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from vattention.attention import AttentionMetadata, create_backend  # noqa: E402
from vattention.kvcache.block_cache import PagedKVCache  # noqa: E402
from vattention.kvcache.spec import KVCacheSpec  # noqa: E402

MODELS = {"llama-3-8b": (32, 8, 128), "yi-6b": (32, 4, 128)}
CONTIGUOUS_DECODE = ["triton_decode", "fa2_varlen", "sdpa", "flex"]
CONTIGUOUS_PREFILL = ["sdpa", "fa2_varlen", "flex"]


class DenseCache:
    """One layer's contiguous cache `[slots, max_len, Hkv, D]` (what `VirtualKVCache` exposes)."""

    def __init__(self, slots: int, max_len: int, hkv: int, d: int, device: str) -> None:
        self.k = torch.randn(slots, max_len, hkv, d, device=device, dtype=DTYPE)
        self.v = torch.randn_like(self.k)

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.k

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.v


def bench(fn: Callable[[], Any]) -> float:
    """Median seconds of `fn` (warm-up excluded)."""
    if DEVICE == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")) / 1e3
    import time

    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def copy_bandwidth() -> float:
    n = (2 << 30) if DEVICE == "cuda" else (16 << 20)
    src = torch.randn(n // 2, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * n / bench(lambda: dst.copy_(src))


def paged_cache(lengths: list[int], hkv: int, d: int, block: int, max_len: int) -> PagedKVCache:
    spec = KVCacheSpec(num_layers=1, num_kv_heads=hkv, head_dim=d, max_slots=len(lengths),
                       max_seq_len=max_len, dtype=DTYPE)  # fmt: skip
    blocks = sum(-(-n // block) for n in lengths) + 1
    cache = PagedKVCache(spec, block, num_blocks=blocks, device=DEVICE)
    cache._k.normal_()
    cache._v.normal_()
    for n in lengths:
        cache.ensure(cache.alloc_slot(), n)
    return cache


def decode_case(
    model: str, batch: int, ctx: int, bw: float, kernels: list[str]
) -> list[dict[str, Any]]:
    hq, hkv, d = MODELS[model]
    gen = torch.Generator().manual_seed(batch * 7 + ctx)
    lengths = torch.randint(ctx // 2, ctx + 1, (batch,), generator=gen).tolist()
    kv_bytes = sum(lengths) * hkv * d * 2 * DTYPE.itemsize
    q = torch.randn(batch, hq, d, device=DEVICE, dtype=DTYPE)
    slots = list(range(batch))
    rows = []

    def record(kernel: str, fn: Callable[[], Any]) -> None:
        try:
            t = bench(fn)
            rows.append({"phase": "decode", "model": model, "batch": batch, "context": ctx,
                         "kernel": kernel, "ms": t * 1e3, "TBps": kv_bytes / t / 1e12,
                         "fraction_of_copy": kv_bytes / t / bw})  # fmt: skip
        except Exception as e:  # a kernel that cannot run this case is reported, not fatal
            rows.append({"phase": "decode", "model": model, "batch": batch, "context": ctx,
                         "kernel": kernel, "error": f"{type(e).__name__}: {str(e)[:160]}"})  # fmt: skip

    dense = DenseCache(batch, ctx, hkv, d, DEVICE)
    meta = AttentionMetadata.build(slots, [n - 1 for n in lengths], [1] * batch, DEVICE)
    for name in kernels:
        if name.startswith("pa_"):
            continue
        try:
            backend = create_backend(name, dense, hq, hkv, d)
        except Exception as e:
            rows.append({"phase": "decode", "model": model, "batch": batch, "context": ctx,
                         "kernel": name, "error": f"{type(e).__name__}: {str(e)[:160]}"})  # fmt: skip
            continue
        record(name, lambda b=backend: b.attend(0, q, meta))
    del dense
    for block in (16, 128):
        if f"pa_triton/{block}" not in kernels:
            continue
        cache = paged_cache(lengths, hkv, d, block, ctx)
        backend = create_backend("pa_triton", cache, hq, hkv, d)
        pmeta = AttentionMetadata.build(slots, [n - 1 for n in lengths], [1] * batch, DEVICE,
                                        cache.block_tables(slots), block)  # fmt: skip
        record(f"pa_triton/{block}", lambda b=backend, m=pmeta: b._decode(  # noqa: SLF001
            0, q, m.block_tables, m.seq_lens, m.max_seq_len))  # fmt: skip
        cache.close()
    return rows


def prefill_case(model: str, seq: int, chunk: int | None) -> list[dict[str, Any]]:
    hq, hkv, d = MODELS[model]
    n_new = seq if chunk is None else chunk
    ctx = seq - n_new
    flops = 2 * seq * seq * hq * d if chunk is None else 4 * n_new * hq * d * (seq - n_new / 2)
    q = torch.randn(n_new, hq, d, device=DEVICE, dtype=DTYPE)
    phase = "prefill" if chunk is None else "chunked_prefill"
    rows = []

    def record(kernel: str, fn: Callable[[], Any]) -> None:
        try:
            t = bench(fn)
            rows.append({"phase": phase, "model": model, "seq": seq, "kernel": kernel,
                         "ms": t * 1e3, "TFLOPs": flops / t / 1e12})  # fmt: skip
        except Exception as e:
            rows.append({"phase": phase, "model": model, "seq": seq, "kernel": kernel,
                         "error": f"{type(e).__name__}: {str(e)[:160]}"})  # fmt: skip

    dense = DenseCache(1, seq, hkv, d, DEVICE)
    meta = AttentionMetadata.build([0], [ctx], [n_new], DEVICE)
    for name in CONTIGUOUS_PREFILL:
        try:
            backend = create_backend(name, dense, hq, hkv, d)
        except Exception as e:
            rows.append({"phase": phase, "model": model, "seq": seq, "kernel": name,
                         "error": f"{type(e).__name__}: {str(e)[:160]}"})  # fmt: skip
            continue
        record(name, lambda b=backend: b.attend(0, q, meta))
    del dense
    cache = paged_cache([seq], hkv, d, 16, seq)
    k_new = torch.randn(n_new, hkv, d, device=DEVICE, dtype=DTYPE)
    pmeta = AttentionMetadata.build([0], [ctx], [n_new], DEVICE, cache.block_tables([0]), 16)
    for name in ("pa_triton", "pa_torch"):
        backend = create_backend(name, cache, hq, hkv, d)
        label = f"{name}/16" + (
            " (FA2 on new K/V)" if name == "pa_triton" and chunk is None else ""
        )
        record(label, lambda b=backend: b.forward(0, q, k_new, k_new, pmeta))
    cache.close()
    return rows


def main() -> None:
    global DEVICE, DTYPE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-kv-gb", type=float, default=40.0)
    args = ap.parse_args()
    DEVICE = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    if DEVICE == "cpu":
        MODELS.update({"llama-3-8b": (4, 2, 16), "yi-6b": (4, 1, 16)})
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    batches = [1, 8, 32, 64, 128, 256] if DEVICE == "cuda" else [1, 4]
    contexts = [1024, 4096, 16384, 65536] if DEVICE == "cuda" else [64, 256]
    seqs = [1024, 2048, 4096, 8192, 16384, 32768, 65536] if DEVICE == "cuda" else [64, 128]
    print("# bench_attention")
    print("config:", json.dumps({**info, "dtype": str(DTYPE), "models": MODELS, "batches": batches,
                                 "contexts": contexts, "prefill_seqs": seqs}))  # fmt: skip
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.3f} TB/s")
    rows: list[dict[str, Any]] = []
    for model in MODELS:
        hq, hkv, d = MODELS[model]
        for batch in batches:
            for ctx in contexts:
                if batch * ctx * hkv * d * 2 * DTYPE.itemsize > args.max_kv_gb * 1e9 / 1.5:
                    continue
                kernels = CONTIGUOUS_DECODE + ["pa_triton/16", "pa_triton/128"]
                if DEVICE == "cuda" and not (batch in (8, 64) and ctx in (4096, 16384)):
                    kernels = [k for k in kernels if k != "flex"]  # compiles per shape: a subset
                if DEVICE == "cpu":
                    kernels = ["triton_decode", "pa_triton/16", "sdpa"]
                new = decode_case(model, batch, ctx, bw, kernels)
                rows += new
                best = {r["kernel"]: r for r in new if "TBps" in r}
                print(f"decode {model} B={batch:3d} L={ctx:6d}: " + "  ".join(
                    f"{k} {r['TBps']:.2f}TB/s" for k, r in best.items()))  # fmt: skip
    for model in ("llama-3-8b",):
        for seq in seqs:
            for chunk in (None, 4096 if DEVICE == "cuda" else 32):
                if chunk is not None and seq <= chunk:
                    continue
                new = prefill_case(model, seq, chunk)
                rows += new
                print(f"{new[0]['phase']} S={seq}: " + "  ".join(
                    f"{r['kernel']} {r['TFLOPs']:.0f}" for r in new if "TFLOPs" in r))  # fmt: skip
    md = render(rows, bw, info)
    print("\n" + md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"info": info, "copy_bandwidth": bw, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md)
        plot(rows, bw, os.path.join(args.out, "attention.png"))


def render(rows: list[dict[str, Any]], bw: float, info: dict[str, str]) -> str:
    lines = [f"# Attention kernels: contiguous (vAttention) vs paged\n\nCommand: `{' '.join(sys.argv)}`  ",
             f"Environment: `{json.dumps(info)}`  \nCopy bandwidth: {bw / 1e12:.3f} TB/s\n",
             "## Decode (TB/s of K/V read; fraction of copy bandwidth)\n"]  # fmt: skip
    dec = [r for r in rows if r["phase"] == "decode"]
    kernels = sorted({r["kernel"] for r in dec})
    lines.append(
        "| model | batch | context | " + " | ".join(kernels) + " | best contiguous / best paged |"
    )
    lines.append("|---" * (len(kernels) + 4) + "|")
    cases = sorted({(r["model"], r["batch"], r["context"]) for r in dec})
    for case in cases:
        got = {r["kernel"]: r for r in dec if (r["model"], r["batch"], r["context"]) == case}
        cells = []
        for k in kernels:
            r = got.get(k)
            cells.append(
                ""
                if r is None
                else ("err" if "error" in r else f"{r['TBps']:.2f} ({r['fraction_of_copy']:.0%})")
            )
        cont = max(
            (r["TBps"] for k, r in got.items() if "TBps" in r and not k.startswith("pa_")),
            default=0,
        )
        paged = max(
            (r["TBps"] for k, r in got.items() if "TBps" in r and k.startswith("pa_")), default=0
        )
        ratio = f"{cont / paged:.2f}x" if paged else ""
        lines.append(
            f"| {case[0]} | {case[1]} | {case[2]} | " + " | ".join(cells) + f" | {ratio} |"
        )
    for phase in ("prefill", "chunked_prefill"):
        pre = [r for r in rows if r["phase"] == phase]
        if not pre:
            continue
        kernels = sorted({r["kernel"] for r in pre})
        lines.append(
            f"\n## {phase.replace('_', ' ').capitalize()} (TFLOP/s, llama-3-8b heads, batch 1)\n"
        )
        lines.append("| tokens | " + " | ".join(kernels) + " |")
        lines.append("|---" * (len(kernels) + 1) + "|")
        for seq in sorted({r["seq"] for r in pre}):
            got = {r["kernel"]: r for r in pre if r["seq"] == seq}
            cells = [
                "" if k not in got else ("err" if "error" in got[k] else f"{got[k]['TFLOPs']:.0f}")
                for k in kernels
            ]
            lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines.append("\n## Errors (kernels that could not run a case)\n")
        seen = set()
        for r in errors:
            key = (r["kernel"], r["error"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r['kernel']}: {r['error']}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], bw: float, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    dec = [r for r in rows if r["phase"] == "decode" and r["model"] == "llama-3-8b" and "TBps" in r
           and r["context"] == 16384]  # fmt: skip
    for k in sorted({r["kernel"] for r in dec}):
        pts = sorted((r["batch"], r["TBps"]) for r in dec if r["kernel"] == k)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
    axes[0].axhline(bw / 1e12, color="gray", ls="--", label="copy bandwidth")
    axes[0].set(xscale="log", xlabel="batch", ylabel="TB/s of K/V read",
                title="Decode, llama-3-8b heads, context 16K (uneven)")  # fmt: skip
    axes[0].legend(fontsize=7)
    pre = [r for r in rows if r["phase"] == "prefill" and "TFLOPs" in r]
    for k in sorted({r["kernel"] for r in pre}):
        pts = sorted((r["seq"], r["TFLOPs"]) for r in pre if r["kernel"] == k)
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
    axes[1].set(
        xscale="log", xlabel="prompt tokens", ylabel="TFLOP/s", title="Fresh prefill, batch 1"
    )
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


DEVICE = "cpu"
DTYPE = torch.float32

if __name__ == "__main__":
    main()
