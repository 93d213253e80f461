"""Attention kernels on contiguous KV caches (vAttention's layout) vs the PagedAttention baseline.

    python benchmarks/bench_attention.py --out benchmarks/results/attention    # GPU, < 6 min
    python benchmarks/bench_attention.py --quick                              # CPU smoke test

- copy: a 1 GiB device-to-device copy; bandwidth = bytes read + written / time (the ceiling);
- decode: one layer, one new token per request, lengths uniform in [L/2, L]; bandwidth = bytes
  of K and V read (sum of lengths x kv_heads x head_dim x 2 x dtype size) / time, and its share
  of the copy bandwidth. Contiguous backends read a `[B, L, Hkv, D]` cache (`--real-cache`: a
  `VirtualKVCache`); paged backends read block pools holding the same tokens, blocks handed out
  in random order (as in a long-running server), for each block size of `--block-sizes`;
- layout: the contiguous backends on a cross-layer strided view (4 layers interleaved per token);
- prefill (batch 1): a fresh prompt of S tokens, TFLOP/s = 2 * S^2 * Hq * D / time (causal:
  QK^T and PV over S^2/2 pairs, 2 flops per multiply-add); and a chunk of C = 4096 new tokens
  over S - C cached ones, FLOPs = 4 * C * Hq * D * (S - C/2).
Backends come from the registry by name (`attend` timed: the whole per-layer call), or are
`auto` with options by a name of `AUTO_VARIANTS` (e.g. `auto:split`); one that raises is
reported with its error. Every output is checked against per-request SDPA
(`torch_sdpa_ref`, untimed) on the same data (relative error). Times: `common.time_ms`
medians, warm-up excluded. Flex compiles per shape, so flex backends run after all the others,
on a subset of decode shapes unless `--flex-everywhere`. A time budget (`--budget-s`) skips
what is left; results are written after every section, so a run cut short still leaves them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import banner, copy_bandwidth, time_ms, write_results  # noqa: E402
from plot_attention import plot_results, render_markdown  # noqa: E402

from vattention.attention import AttentionMetadata, get_backend_class  # noqa: E402

MODELS = {"llama-3-8b": (32, 8, 128), "yi-6b": (32, 4, 128), "tiny": (4, 2, 16)}
# `auto` with options: its prefill as one FA2 launch (no cuDNN), our Triton kernel, or with long
# chunks over a cached context split into two cuDNN calls merged by log-sum-exp (`split_chunk`).
AUTO_VARIANTS: dict[str, dict[str, Any]] = {
    "auto:fa2": {"prefill": "fa2_varlen", "cudnn_min_tokens": 0, "split_chunks": False},
    "auto:cudnn": {"prefill": "fa2_varlen", "split_chunks": False},
    "auto:split": {"prefill": "fa2_varlen", "split_chunks": True},
    "auto:triton": {"prefill": "triton"},
}
FLEX_SUBSET = {(8, 4096), (64, 4096), (8, 16384), (64, 16384), (3, 48)}  # (3, 48): --quick


@dataclass
class Views:
    """A `KVCacheView` over one layer's K and V tensors (every layer reads the same ones)."""

    k: torch.Tensor
    v: torch.Tensor
    owner: Any = None  # a real cache to close afterwards

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.k

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.v


@dataclass
class Case:
    model: str
    hq: int
    hkv: int
    d: int
    batch: int
    ctx: int  # L: the cache's max length
    lens: list[int]  # tokens per request (after this step's write)
    dtype: torch.dtype
    device: torch.device


def contiguous(c: Case, layout: str, real_cache: bool) -> Views:
    """Random K/V in a contiguous cache: `[B, L, Hkv, D]`, a cross-layer strided view of
    `[B, L, 4, Hkv, D]`, or (`real_cache`) a `VirtualKVCache` backed up to each length."""
    if real_cache and layout == "per_layer":
        from vattention.kvcache.spec import KVCacheSpec
        from vattention.kvcache.virtual import VirtualKVCache

        spec = KVCacheSpec(1, c.hkv, c.d, c.batch, c.ctx, c.dtype, layout="per_layer")
        budget = spec.token_bytes * c.batch * c.ctx + 8 * c.batch * (2 << 20)
        cache = VirtualKVCache(spec, c.device.type, device=c.device, budget_bytes=budget)
        slots = [cache.alloc_slot() for _ in c.lens]
        if slots != list(range(c.batch)):
            raise RuntimeError(f"a fresh VirtualKVCache handed out slots {slots}, not 0..B-1")
        cache.step(dict(zip(slots, c.lens, strict=True)))
        for b, n in zip(slots, c.lens, strict=True):
            cache.k_cache(0)[b, :n].normal_()
            cache.v_cache(0)[b, :n].normal_()
        return Views(cache.k_cache(0), cache.v_cache(0), cache)
    shape: tuple[int, ...] = (c.batch, c.ctx, c.hkv, c.d)
    if layout == "cross_layer":
        shape = (c.batch, c.ctx, 4, c.hkv, c.d)
    k, v = (torch.empty(shape, device=c.device, dtype=c.dtype).normal_() for _ in range(2))
    return Views(k[:, :, 1], v[:, :, 1]) if layout == "cross_layer" else Views(k, v)


def paged_from(cont: Views, lens: list[int], bs: int,
               gen: torch.Generator) -> tuple[Views, list[list[int]]]:  # fmt: skip
    """Block pools holding the same tokens as `cont`, blocks in random order (0: padding)."""
    hkv, d, dev = cont.k.shape[2], cont.k.shape[3], cont.k.device
    counts = [-(-n // bs) for n in lens]
    perm = (torch.randperm(sum(counts), generator=gen) + 1).tolist()
    tables, at = [], 0
    for n in counts:
        tables.append(perm[at : at + n])
        at += n
    shape = (sum(counts) + 1, bs, hkv, d)
    pools = Views(*(torch.zeros(shape, device=dev, dtype=cont.k.dtype) for _ in range(2)))
    offsets = torch.arange(bs, device=dev)
    for b, (n, table) in enumerate(zip(lens, tables, strict=True)):
        blocks = torch.tensor(table, device=dev)
        rows = (blocks.unsqueeze(1) * bs + offsets).flatten()[:n]
        pools.k.view(-1, hkv, d).index_copy_(0, rows, cont.k[b, :n])
        pools.v.view(-1, hkv, d).index_copy_(0, rows, cont.v[b, :n])
    return pools, tables


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, CPU-friendly")
    ap.add_argument("--out", default=None, help="folder for results.json, results.md, PNGs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="llama-3-8b,yi-6b")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--contexts", default="1024,4096,16384,65536")
    ap.add_argument("--prefill-lens", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--chunk", type=int, default=4096, help="chunked-prefill new tokens (0: off)")
    ap.add_argument("--decode-backends", default="triton_decode,fa2_varlen,flex,sdpa")
    ap.add_argument("--prefill-backends", default="sdpa,fa2_varlen,flex")
    ap.add_argument("--paged-backends", default="paged_triton,paged_flex")
    ap.add_argument("--block-sizes", default="16,128")
    ap.add_argument("--max-kv-gb", type=float, default=60.0, help="skip bigger decode caches")
    ap.add_argument("--budget-s", type=float, default=270.0, help="time budget for measuring")
    ap.add_argument("--phases", default="prefill,decode", help="which phases, in this order")
    ap.add_argument("--flex-everywhere", action="store_true", help="flex on every decode shape")
    ap.add_argument("--no-layout", action="store_true", help="skip the cross-layer section")
    ap.add_argument("--real-cache", action="store_true", help="contiguous = VirtualKVCache")
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.models, args.batches, args.contexts = "tiny", "3", "48"
        args.prefill_lens, args.chunk, args.block_sizes = "48", 16, "16"
        args.prefill_backends = "sdpa,fa2_varlen"  # eager flex re-traces per shape: slow here
    for key in ("batches", "contexts", "prefill_lens", "block_sizes"):
        setattr(args, key, [int(x) for x in getattr(args, key).split(",") if x])
    for key in ("models", "decode_backends", "prefill_backends", "paged_backends", "phases"):
        setattr(args, key, [x for x in getattr(args, key).split(",") if x])
    bad = [p for p in args.phases if p not in ("prefill", "decode")]
    if bad:
        ap.error(f"unknown phases {bad}; known: prefill, decode")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {sorted(MODELS)}")
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, info: dict[str, str], copy: dict[str, float]) -> None:  # fmt: skip
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.float32 if args.quick else torch.bfloat16
        self.copy_bps = copy["bytes_per_s"]
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {
            "banner": info,
            "config": vars(args),
            "copy": copy,
            "rows": self.rows,
        }

    def save(self) -> str:
        """Write what is measured so far (a run cut short still leaves its results)."""
        self.results["seconds"] = time.monotonic() - self.start
        md = render_markdown(self.results, " ".join(sys.argv))
        if self.args.out:
            write_results(self.args.out, self.results, md)
        return md

    def measure(self, name: str, cache: Views, c: Case, q: torch.Tensor, meta: AttentionMetadata,
                ref: torch.Tensor | None) -> dict[str, Any]:  # fmt: skip
        """Time backend `name`'s `attend` (the whole per-layer call) on one case."""
        left = self.deadline - time.monotonic()
        if left < (45 if "flex" in name and not self.args.quick else 0):
            return {"error": "skipped: time budget"}
        try:
            base, opts = ("auto", AUTO_VARIANTS[name]) if name in AUTO_VARIANTS else (name, {})
            attn = get_backend_class(base)(cache, c.hq, c.hkv, c.d, **opts)
            out = attn.attend(0, q, meta)
            ms = time_ms(lambda: attn.attend(0, q, meta), self.device,
                         warmup_ms=self.args.warmup_ms, rep_ms=self.args.rep_ms,
                         cpu_reps=1 if self.args.quick else 3)  # fmt: skip
        except Exception as err:  # a backend that cannot run a case is reported, not fatal
            return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        fields: dict[str, Any] = {"ms": ms}
        if ref is not None:
            fields["rel_err"] = float((out.float() - ref).norm() / ref.norm())
        return fields

    def decode(self, model: str, layout: str, flex: bool) -> None:
        """Decode cases of `model`: the flex backends only (`flex`), or all the others."""
        a, (hq, hkv, d) = self.args, MODELS[model]
        layers = 4 if layout == "cross_layer" else 1
        for batch in a.batches:
            for ctx in a.contexts:
                subset = (batch, ctx) in FLEX_SUBSET
                if (layout == "cross_layer" or flex) and not (subset or a.flex_everywhere):
                    continue
                if layers * batch * ctx * hkv * d * 2 * self.dtype.itemsize > a.max_kv_gb * 1e9:
                    continue
                gen = torch.Generator().manual_seed(a.seed + 1000003 * batch + ctx)
                lens = torch.randint(ctx // 2, ctx + 1, (batch,), generator=gen).tolist()
                c = Case(model, hq, hkv, d, batch, ctx, lens, self.dtype, self.device)
                nbytes = sum(lens) * hkv * d * 2 * self.dtype.itemsize
                q = torch.randn(batch, hq, d, generator=gen).to(self.device, self.dtype)
                fields = {"model": model, "batch": batch, "context": ctx, "kv_gb": nbytes / 1e9}
                phase = "decode" if layout == "per_layer" else "layout"
                paged = self._pick(a.paged_backends, flex) if layout == "per_layer" else []
                self._case(phase, c, q, [n - 1 for n in lens], [1] * batch,
                           self._pick(a.decode_backends, flex), paged, layout, fields,
                           ("tb_s", nbytes / 1e12), gen, True)  # fmt: skip

    def prefill(self, model: str, chunk: int, flex: bool) -> None:
        """A fresh prompt (`chunk` 0) or a chunk of `chunk` tokens over a cached context."""
        a, (hq, hkv, d) = self.args, MODELS[model]
        for s in a.prefill_lens:
            new = chunk or s
            if new > s or (chunk and new == s):
                continue
            gen = torch.Generator().manual_seed(a.seed + s + chunk)
            c = Case(model, hq, hkv, d, 1, s, [s], self.dtype, self.device)
            flops = 2.0 * s * s * hq * d if not chunk else 4.0 * new * hq * d * (s - new / 2)
            q = torch.randn(new, hq, d, generator=gen).to(self.device, self.dtype)
            self._case("chunked_prefill" if chunk else "prefill", c, q, [s - new], [new],
                       self._pick(a.prefill_backends, flex), self._pick(a.paged_backends, flex),
                       "per_layer", {"model": model, "seq_len": s, "new_tokens": new},
                       ("tflop_s", flops / 1e12), gen, s <= (8192 if chunk else 16384))  # fmt: skip

    @staticmethod
    def _pick(names: list[str], flex: bool) -> list[str]:
        return [n for n in names if ("flex" in n) == flex]

    def _case(self, phase: str, c: Case, q: torch.Tensor, ctx_lens: list[int],
              q_lens: list[int], names: list[str], paged: list[str], layout: str,
              fields: dict[str, Any], metric: tuple[str, float], gen: torch.Generator,
              check: bool) -> None:  # fmt: skip
        """Run every backend on one case (same tokens), record rows, print one line. With
        `check`, outputs are compared with `torch_sdpa_ref` (a chunk over a long context makes
        it materialize scores: too big past 8K tokens)."""
        if not names and not paged:
            return
        slots = list(range(c.batch))
        meta = AttentionMetadata.build(slots, ctx_lens, q_lens, self.device)
        cont = contiguous(c, layout, self.args.real_cache)
        ref = None
        try:  # the reference: plain per-request SDPA over the contiguous cache, untimed
            if check:
                sdpa = get_backend_class("torch_sdpa_ref")(cont, c.hq, c.hkv, c.d)
                ref = sdpa.attend(0, q, meta).float()
        except Exception as err:
            print(f"no reference for this case: {type(err).__name__}: {err}", flush=True)
        runs = [(n, n, cont, meta) for n in names]
        line = []
        for bs in self.args.block_sizes if paged else []:
            pools, tables = paged_from(cont, c.lens, bs, gen)
            pmeta = AttentionMetadata.build(slots, ctx_lens, q_lens, self.device, tables, bs)
            runs += [(n, f"{n}/{bs}", pools, pmeta) for n in paged]
        for name, label, cache, m in runs:
            row = {"phase": phase, **fields, "backend": label}
            row.update(self.measure(name, cache, c, q, m, ref))
            if "ms" in row:
                row[metric[0]] = metric[1] / (row["ms"] * 1e-3)
                if metric[0] == "tb_s":
                    row["copy_frac"] = row["tb_s"] * 1e12 / self.copy_bps
                line.append(f"{label} {row[metric[0]]:.3g}")
            self.rows.append(row)
        where = " ".join(
            f"{k}={v}" for k, v in fields.items() if k in ("batch", "context", "seq_len")
        )
        where = where.replace("batch=", "B=").replace("context=", "L=").replace("seq_len=", "S=")
        unit = "TB/s" if metric[0] == "tb_s" else "TFLOP/s"
        print(f"{phase} {c.model} {where}: " + "  ".join(line) + f" ({unit})", flush=True)
        if cont.owner is not None:
            cont.owner.close()
        del runs, cont
        free(self.device)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    try:  # flex recompiles per shape: let it keep compiling instead of falling back to eager
        import torch._dynamo.config as dynamo_config

        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(512, getattr(dynamo_config, knob)))
    except ImportError:
        pass
    info = banner(device)
    print("# bench_attention\n" + "\n".join(f"{k}: {v}" for k, v in info.items()))
    print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
    copy = copy_bandwidth(device, 8 << 20 if args.quick else 1 << 30)
    print(f"copy bandwidth: {copy['bytes_per_s'] / 1e12:.3f} TB/s (read + written)", flush=True)
    bench = Bench(args, info, copy)
    first = args.models[0]
    # Most important first; flex (which compiles per shape) after every other kernel.
    for flex in (False, True):
        for phase in args.phases:
            for model in args.models if not flex else [first]:
                if phase == "decode":
                    bench.decode(model, "per_layer", flex)
                elif model == first:
                    bench.prefill(model, 0, flex)
                    if args.chunk:
                        bench.prefill(model, args.chunk, flex)
                bench.save()
    if not args.no_layout and "decode" in args.phases:
        bench.decode(first, "cross_layer", False)
    md = bench.save()
    print("\n" + md)
    if args.out:
        for path in plot_results(bench.results, args.out):
            print(f"wrote {path}")
        print(f"wrote {args.out}/results.json and results.md")
    for r in bench.rows:
        if r.get("rel_err", 0.0) > 3e-2:
            print(f"WARNING: {r['backend']} ({r['phase']}) differs from the reference: "
                  f"rel_err {r['rel_err']:.2e} ({r})")  # fmt: skip


if __name__ == "__main__":
    main()
