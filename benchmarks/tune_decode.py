"""Tune the contiguous Triton decode kernel's partition heuristic on the GPU.

    python benchmarks/tune_decode.py --out /tmp/tune      # H200: about 2 minutes

For each decode shape (Llama-3-8B and Yi-6B heads, lengths uniform in [L/2, L], as in
`bench_attention`), times `triton_decode` with the partition size that
`default_partition_size(programs_per_sm=P, min_size=M)` gives, for every (P, M) of the grid,
next to `paged_triton` (block 16, its own default) on the same tokens. Prints one line per shape
(TB/s of K/V read) and, per variant, the geometric mean and the minimum of its ratio to paged.
Warm-up excluded (`common.time_ms`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import MODELS, Case, contiguous, paged_from  # noqa: E402
from common import banner, time_ms, write_results  # noqa: E402

from vattention.attention import AttentionMetadata, get_backend_class  # noqa: E402
from vattention.attention.decode_kernels import default_partition_size, num_sms  # noqa: E402


def tb_s(fn: Callable[[], object], nbytes: int, dev: torch.device, rep_ms: float) -> float:
    """TB/s of K/V read by one `fn()` call (median, warm-up excluded)."""
    return nbytes / 1e12 / (time_ms(fn, dev, rep_ms=rep_ms) * 1e-3)


def shape_row(c: Case, variants: list[tuple[int, int]], rep_ms: float) -> dict[str, Any]:
    """paged_triton/16 and every triton_decode variant on one shape (same tokens)."""
    gen = torch.Generator().manual_seed(1000003 * c.batch + c.ctx)
    dev, slots = c.device, list(range(c.batch))
    nbytes = sum(c.lens) * c.hkv * c.d * 4
    q = torch.randn(c.batch, c.hq, c.d, generator=gen).to(dev, c.dtype)
    ctx_lens = [n - 1 for n in c.lens]
    meta = AttentionMetadata.build(slots, ctx_lens, [1] * c.batch, dev)
    cont = contiguous(c, "per_layer", False)
    pools, tables = paged_from(cont, c.lens, 16, gen)
    pmeta = AttentionMetadata.build(slots, ctx_lens, [1] * c.batch, dev, tables, 16)
    paged = get_backend_class("paged_triton")(pools, c.hq, c.hkv, c.d)
    row: dict[str, Any] = {"model": c.model, "batch": c.batch, "context": c.ctx}
    row["paged_triton/16"] = tb_s(lambda: paged.attend(0, q, pmeta), nbytes, dev, rep_ms)
    for p, m in variants:
        size = default_partition_size(c.batch, c.hkv, c.ctx, 64, num_sms(dev),
                                      programs_per_sm=p, min_size=m)  # fmt: skip
        attn = get_backend_class("triton_decode")(cont, c.hq, c.hkv, c.d, partition_size=size)
        row[f"P{p}/M{m}"] = tb_s(lambda attn=attn: attn.attend(0, q, meta), nbytes, dev, rep_ms)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default="llama-3-8b,yi-6b")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--contexts", default="1024,4096,16384,65536")
    ap.add_argument("--programs-per-sm", default="4,8,16,32")
    ap.add_argument("--min-sizes", default="256,512,1024")
    ap.add_argument("--max-kv-gb", type=float, default=30.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    info = banner(dev)
    print("# tune_decode\n" + "\n".join(f"{k}: {v}" for k, v in info.items()))
    print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(a).items())), flush=True)
    variants = [(int(p), int(m)) for p in a.programs_per_sm.split(",")
                for m in a.min_sizes.split(",")]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for model in a.models.split(","):
        hq, hkv, d = MODELS[model]
        for batch in map(int, a.batches.split(",")):
            for ctx in map(int, a.contexts.split(",")):
                if batch * ctx * hkv * d * 4 > a.max_kv_gb * 1e9:
                    continue
                gen = torch.Generator().manual_seed(1000003 * batch + ctx)
                lens = torch.randint(ctx // 2, ctx + 1, (batch,), generator=gen).tolist()
                c = Case(model, hq, hkv, d, batch, ctx, lens, torch.bfloat16, dev)
                row = shape_row(c, variants, a.rep_ms)
                rows.append(row)
                tuned = {k: v for k, v in row.items() if k.startswith("P")}
                best = max(tuned, key=lambda k: tuned[k])
                print(f"{model} B={batch} L={ctx}: paged {row['paged_triton/16']:.3f} best {best} "
                      f"{tuned[best]:.3f} | " + " ".join(f"{k}={v:.2f}" for k, v in tuned.items()),
                      flush=True)  # fmt: skip
                torch.cuda.empty_cache()
    summary = {}
    for p, m in variants:
        r = [row[f"P{p}/M{m}"] / row["paged_triton/16"] for row in rows]
        summary[f"P{p}/M{m}"] = {"geomean": math.exp(sum(map(math.log, r)) / len(r)), "min": min(r)}
    print("variant: geomean and min of triton_decode / paged_triton/16 over the shapes")
    for k, v in sorted(summary.items(), key=lambda kv: -kv[1]["geomean"]):
        print(f"  {k}: {v['geomean']:.3f} {v['min']:.3f}")
    if a.out:
        results = {"banner": info, "config": vars(a), "rows": rows, "summary": summary}
        write_results(a.out, results, "")


if __name__ == "__main__":
    main()
