"""Cascade decoding at kernel level: one decode step of B requests behind one shared prompt.

    python benchmarks/bench_cascade.py --model llama-3-8b --batches 64,256 --prefix 4096
    python benchmarks/bench_cascade.py --quick          # CPU smoke test (Triton interpreter)

Both caches hold the prompt once, shared the way the engine shares it: the real
`VirtualKVCache` (one request computes the prompt and publishes its pages; the others map the
same physical pages, the third on through a prefix segment) and the real `PagedKVCache` (the
same leading blocks in every table). Each request then has its own 1..`--suffix-max` tokens.
Per cache and batch: the split-K decode kernel reading every request's whole context
(`plain`), and with `SharedPrefix` (`cascade`: the prompt attended once for all sharers), in
milliseconds (warm-up excluded, median), their ratio, and the plain kernel's logical K/V rate
(bytes it would read per request, over its time: above the copy bandwidth where the shared
pages hit in L2). The two outputs are checked equal within bf16 tolerance before timing.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if "--quick" in sys.argv:  # the kernels run under Triton's interpreter, set before its import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import banner, print_table, time_ms, write_results  # noqa: E402

from vattention.attention.decode_kernels import decode_attention  # noqa: E402
from vattention.attention.shared_prefix import SharedPrefix  # noqa: E402
from vattention.kvcache.paged import PagedKVCache  # noqa: E402
from vattention.kvcache.spec import KVCacheSpec  # noqa: E402
from vattention.kvcache.virtual import VirtualKVCache  # noqa: E402
from vattention.models.presets import get_preset  # noqa: E402


def shared_batch(cache: Any, batch: int, prefix: int, suffixes: list[int]) -> list[int]:
    """Slots of `batch` requests: the first computes `prefix` tokens and publishes them; the
    others map them (`alloc_slot(keys)`) and add their own tokens. Returns the slots."""
    per = cache.tokens_per_page
    keys = [f"p{i}" for i in range(prefix // per)]
    first = cache.alloc_slot()
    cache.ensure(first, prefix + suffixes[0])
    k, v = cache.k_cache(0), cache.v_cache(0)
    _fill(cache, k, v, first, 0, prefix + suffixes[0])
    cache.cache_pages(first, keys)
    slots = [first]
    for n in suffixes[1:]:
        s = cache.alloc_slot(keys)
        cache.ensure(s, prefix + n)
        _fill(cache, k, v, s, prefix, prefix + n)
        slots.append(s)
    return slots


def _fill(cache: Any, k: torch.Tensor, v: torch.Tensor, slot: int, a: int, z: int) -> None:
    """Random K/V for tokens [a, z) of `slot` (block by block on the paged cache)."""
    if isinstance(cache, PagedKVCache):
        bs = cache.block_size
        for pos in range(a, z, bs):
            block = cache.block_table(slot)[pos // bs]
            n = min(bs - pos % bs, z - pos)
            k[block, pos % bs : pos % bs + n].normal_()
            v[block, pos % bs : pos % bs + n].normal_()
        return
    k[slot, a:z].normal_()
    v[slot, a:z].normal_()


def run_case(args: argparse.Namespace, kind: str, batch: int, dev: torch.device) -> dict[str, Any]:
    c = get_preset(args.model)
    hkv, d, hq = c.num_kv_heads, c.head_dim, c.num_heads
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(batch)
    suffixes = torch.randint(1, args.suffix_max + 1, (batch,), generator=gen).tolist()
    max_len = args.prefix + args.suffix_max
    spec = KVCacheSpec(1, hkv, d, batch, max_len, dtype, layout="per_layer",
                       page_size=args.page_size)  # fmt: skip
    budget = 2 * spec.token_bytes * (args.prefix + batch * (args.suffix_max + 2 * 1024))
    if kind == "vattention":
        cache: Any = VirtualKVCache(spec, dev.type, device=dev, budget_bytes=budget,
                                    lookahead_tokens=0)  # fmt: skip
    else:
        cache = PagedKVCache(spec, args.block_size, budget_bytes=budget, device=dev)
    with cache:
        if args.prefix % cache.tokens_per_page:
            raise ValueError(f"--prefix must be a multiple of {cache.tokens_per_page} tokens")
        slots = shared_batch(cache, batch, args.prefix, suffixes)
        seq = torch.tensor([args.prefix + n for n in suffixes], dtype=torch.int32, device=dev)
        q = torch.randn(batch, hq, d, generator=gen).to(dev, dtype)
        k, v = cache.k_cache(0), cache.v_cache(0)
        i32 = {"dtype": torch.int32, "device": dev}
        slot_t = torch.tensor(slots, **i32)
        tables = None
        if kind == "paged":
            tables = torch.from_numpy(cache.block_table_array(slots)).to(dev)
        leader = 0 if kind == "paged" else slots[0]
        prefix = SharedPrefix(torch.full((batch,), args.prefix, **i32),
                              torch.tensor([args.prefix], **i32), torch.tensor([leader], **i32),
                              args.prefix)  # fmt: skip
        scale = d**-0.5

        def plain() -> torch.Tensor:
            return decode_attention(q, k, v, slot_t, seq, scale, max_len, block_tables=tables)

        def cascade() -> torch.Tensor:
            return decode_attention(q, k, v, slot_t, seq, scale, max_len, block_tables=tables,
                                    prefix=prefix)  # fmt: skip

        err = (plain().float() - cascade().float()).abs().max().item()
        if err > (1e-4 if dtype == torch.float32 else 3e-2):
            raise RuntimeError(f"{kind} B={batch}: cascade differs from plain by {err}")
        t_plain = time_ms(plain, dev, cpu_reps=1)
        t_cascade = time_ms(cascade, dev, cpu_reps=1)
        logical = sum(args.prefix + n for n in suffixes) * 2 * hkv * d * q.element_size()
        return {
            "cache": kind, "batch": batch, "prefix": args.prefix,
            "suffix_mean": sum(suffixes) / batch, "plain_ms": t_plain, "cascade_ms": t_cascade,
            "speedup": t_plain / t_cascade, "plain_logical_TBps": logical / t_plain / 1e9,
            "max_abs_diff": err,
        }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--prefix", type=int, default=4096, help="shared tokens (whole pages)")
    ap.add_argument("--suffix-max", type=int, default=512, help="own tokens: uniform 1..this")
    ap.add_argument("--page-size", type=int, default=None, help="vAttention page bytes")
    ap.add_argument("--block-size", type=int, default=16, help="paged block tokens")
    ap.add_argument("--systems", default="vattention,paged")
    ap.add_argument("--quick", action="store_true", help="tiny CPU run (Triton interpreter)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.model, args.batches, args.prefix, args.suffix_max = "tiny", "6", 64, 24
        args.page_size, args.block_size = args.page_size or 4096, 8
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    info = banner(dev)
    print(f"config: {vars(args)}")
    print(f"environment: {info}")
    rows = [
        run_case(args, kind, int(b), dev)
        for b in args.batches.split(",")
        for kind in args.systems.split(",")
    ]
    cols = ["cache", "batch", "prefix", "suffix_mean", "plain_ms", "cascade_ms", "speedup",
            "plain_logical_TBps", "max_abs_diff"]  # fmt: skip
    print_table("One decode step behind a shared prompt", rows, cols)
    if args.out:
        from common import markdown_table

        md = (f"# Cascade decoding, one step\n\nCommand: `benchmarks/bench_cascade.py` with "
              f"`{vars(args)}`  \nEnvironment: `{info}`\n\n{markdown_table(rows, cols)}\n")  # fmt: skip
        write_results(args.out, {"config": vars(args), "environment": info, "rows": rows}, md)


if __name__ == "__main__":
    main()
