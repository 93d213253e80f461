"""Tables and plots of `bench_attention.py` results (its `results.json`).

    python benchmarks/plot_attention.py benchmarks/results/attention/results.json

`render_markdown(results, command)`: decode bandwidth per model (TB/s and share of the copy
bandwidth, with the best-contiguous / best-paged ratio of each row), the cross-layer layout,
prefill and chunked-prefill TFLOP/s, the largest relative error per backend (against
`torch_sdpa_ref` on the same data), and the errors.
`plot_results(results, out)`: PNGs (decode TB/s vs batch per context; prefill TFLOP/s vs
length) when matplotlib is installed; without it, a note and no files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PAGED_PREFIXES = ("paged", "pa_")


def _is_paged(backend: str) -> bool:
    return backend.startswith(PAGED_PREFIXES)


def _backends(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Backend labels in order of appearance, contiguous ones first."""
    seen = list(dict.fromkeys(r["backend"] for r in rows))
    return sorted(seen, key=lambda name: (_is_paged(name), seen.index(name)))


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(row) + " |" for row in body
    ]


def _decode_tables(rows: list[dict[str, Any]], phase: str) -> list[str]:
    out: list[str] = []
    for model in dict.fromkeys(r["model"] for r in rows if r["phase"] == phase):
        sel = [r for r in rows if r["phase"] == phase and r["model"] == model]
        names = _backends(sel)
        body = []
        for batch, ctx in dict.fromkeys((r["batch"], r["context"]) for r in sel):
            got = {r["backend"]: r for r in sel if (r["batch"], r["context"]) == (batch, ctx)}
            cells = [
                "" if n not in got else
                ("err" if "tb_s" not in got[n] else f"{got[n]['tb_s']:.3g} ({got[n]['copy_frac']:.0%})")
                for n in names
            ]  # fmt: skip
            best = {
                paged: max((r["tb_s"] for n, r in got.items() if "tb_s" in r and _is_paged(n) == paged), default=0.0)
                for paged in (False, True)
            }  # fmt: skip
            ratio = f"{best[False] / best[True]:.2f}x" if best[True] and best[False] else ""
            kv = next(iter(got.values()))["kv_gb"]
            body.append([str(batch), str(ctx), f"{kv:.2f}", *cells, ratio])
        title = "Decode" if phase == "decode" else "Decode, cross-layer strided cache (4 layers)"
        out += [f"\n## {title}: {model} (TB/s of K/V read, share of copy bandwidth)\n"]
        out += _table(["batch", "context", "KV GB", *names, "best contiguous / best paged"], body)
    return out


def _prefill_tables(rows: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for phase in ("prefill", "chunked_prefill"):
        sel = [r for r in rows if r["phase"] == phase]
        if not sel:
            continue
        names = _backends(sel)
        body = []
        for s in dict.fromkeys(r["seq_len"] for r in sel):
            got = {r["backend"]: r for r in sel if r["seq_len"] == s}
            cells = [
                "" if n not in got else ("err" if "tflop_s" not in got[n] else f"{got[n]['tflop_s']:.3g}")
                for n in names
            ]  # fmt: skip
            body.append([str(s), str(next(iter(got.values()))["new_tokens"]), *cells])
        what = "fresh prompt" if phase == "prefill" else "chunk over a cached context"
        out += [f"\n## {phase.replace('_', ' ').capitalize()} ({what}, batch 1, TFLOP/s)\n"]
        out += _table(["tokens", "new tokens", *names], body)
    return out


def render_markdown(results: dict[str, Any], command: str) -> str:
    rows: list[dict[str, Any]] = results["rows"]
    banner = ", ".join(f"{k} {v}" for k, v in results["banner"].items())
    lines = [
        "# Attention kernels: contiguous KV cache (vAttention) vs paged (PagedAttention)\n",
        f"Command: `{command}`  ",
        f"Environment: {banner}  ",
        f"Copy bandwidth (read + written): {results['copy']['bytes_per_s'] / 1e12:.3f} TB/s  ",
        f"Measured in {results['seconds']:.0f} s. Decode lengths uniform in [L/2, L]; prefill "
        "FLOPs = 2 S^2 Hq D (causal), chunk FLOPs = 4 C Hq D (S - C/2).",
    ]
    lines += _decode_tables(rows, "decode") + _decode_tables(rows, "layout")
    lines += _prefill_tables(rows)
    worst: dict[str, float] = {}
    for r in rows:
        if "rel_err" in r:
            worst[r["backend"]] = max(worst.get(r["backend"], 0.0), r["rel_err"])
    if worst:
        lines += ["\n## Largest relative error vs per-request SDPA (`torch_sdpa_ref`, same data)\n"]
        lines += _table(["backend", "rel err"], [[k, f"{v:.1e}"] for k, v in worst.items()])
    errors = dict.fromkeys((r["backend"], r["error"]) for r in rows if "error" in r)
    if errors:
        lines += ["\n## Backends that could not run a case\n"]
        lines += [f"- {name}: {err}" for name, err in errors]
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write decode and prefill PNGs under `out`; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    rows, paths = results["rows"], []
    copy_tb = results["copy"]["bytes_per_s"] / 1e12
    for model in dict.fromkeys(r["model"] for r in rows if r["phase"] == "decode"):
        sel = [r for r in rows if r["phase"] == "decode" and r["model"] == model and "tb_s" in r]
        contexts = list(dict.fromkeys(r["context"] for r in sel))
        if not contexts:
            continue
        fig, axes = plt.subplots(
            1, len(contexts), figsize=(4.2 * len(contexts), 3.8), squeeze=False
        )
        for ax, ctx in zip(axes[0], contexts, strict=True):
            for name in _backends(sel):
                pts = sorted(
                    (r["batch"], r["tb_s"])
                    for r in sel
                    if r["backend"] == name and r["context"] == ctx
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker="o",
                        ls="--" if _is_paged(name) else "-",
                        label=name,
                    )
            ax.axhline(copy_tb, color="gray", lw=0.8, label="copy")
            ax.set(xscale="log", xlabel="batch", ylabel="TB/s", title=f"{model}, L={ctx}")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        paths.append(Path(out) / f"decode_{model}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    for phase in ("prefill", "chunked_prefill"):
        sel = [r for r in rows if r["phase"] == phase and "tflop_s" in r]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name in _backends(sel):
            pts = sorted((r["seq_len"], r["tflop_s"]) for r in sel if r["backend"] == name)
            ax.plot(
                *zip(*pts, strict=True), marker="o", ls="--" if _is_paged(name) else "-", label=name
            )
        ax.set(xscale="log", xlabel="tokens", ylabel="TFLOP/s", title=phase.replace("_", " "))
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(Path(out) / f"{phase}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.json written by bench_attention.py")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: beside the JSON)")
    args = ap.parse_args()
    results = json.loads(Path(args.results).read_text())
    print(render_markdown(results, " ".join(sys.argv)))
    for p in plot_results(results, args.out or Path(args.results).parent):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
