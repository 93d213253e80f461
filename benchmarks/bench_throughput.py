"""Offline throughput: N requests x P prompt tokens x O output tokens (greedy, no EOS stop).

Runs, in one process and one after the other on the same GPU: our engine with the vAttention
cache, our engine with the paged baseline cache, and Hugging Face transformers' continuous
batching (`generate_batch`), all on the same random-weight model (a preset, bf16).

    python benchmarks/bench_throughput.py --out benchmarks/results/throughput
    python benchmarks/bench_throughput.py --quick          # CPU smoke test on the tiny preset

Each system first runs a small warm-up batch (excluded); the timed run is one `generate` call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vattention import LLM, SamplingParams  # noqa: E402
from vattention.models.presets import get_preset  # noqa: E402


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=gen).tolist()


def run_ours(args: argparse.Namespace, kv_cache: str, prompts: list[list[int]]) -> dict[str, Any]:
    opts: dict[str, Any] = dict(
        kv_cache=kv_cache, load_format="dummy", dtype=args.dtype,
        max_model_len=args.prompt_len + args.output_len + 16, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens, enforce_eager=args.eager,
        device=args.device,
    )  # fmt: skip
    if args.quick:
        opts["kv_page_size"] = 64 * 1024
    t0 = time.perf_counter()
    llm = LLM(args.model, **opts)
    setup = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(prompts[: min(8, len(prompts))], warm, use_tqdm=False)
    _sync()
    llm.engine.timings = dict.fromkeys(llm.engine.timings, 0.0)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    _sync()
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.token_ids) for o in outs)
    stats = llm.engine.cache.stats() if hasattr(llm.engine.cache, "stats") else None
    result = {
        "system": f"vattention engine, kv_cache={kv_cache}",
        "seconds": elapsed,
        "output_tokens": generated,
        "output_tok_per_s": generated / elapsed,
        "total_tok_per_s": (generated + sum(map(len, prompts))) / elapsed,
        "preemptions": llm.engine.scheduler.num_preemptions,
        "setup_s": setup,
        "attention_backend": type(llm.engine.attn).__name__,
        "cuda_graphs": llm.engine.runner.graphs is not None,
        "phase_seconds": {k: round(v, 3) for k, v in llm.engine.timings.items()},
    }
    if stats is not None:
        result["kv_stats"] = stats.as_dict() if hasattr(stats, "as_dict") else str(stats)
    if llm.engine.memory_profile is not None:  # what the KV budget was sized from (bytes)
        result["memory_profile"] = llm.engine.memory_profile.as_dict()
    llm.close()
    del llm, outs
    _free()
    return result


def run_hf(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    import transformers
    from transformers import GenerationConfig

    c = get_preset(args.model)
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    impl = "paged|sdpa"
    model.config._attn_implementation = impl
    gen_cfg = GenerationConfig(
        max_new_tokens=args.output_len, do_sample=False, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    model.generate_batch(prompts[:8], generation_config=gen_cfg, max_new_tokens=8)
    _sync()
    t0 = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=gen_cfg)
    _sync()
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.generated_tokens) for o in outs.values())
    del model
    _free()
    return {
        "system": f"HF transformers {transformers.__version__} generate_batch ({impl})",
        "seconds": elapsed,
        "output_tokens": generated,
        "output_tok_per_s": generated / elapsed,
        "total_tok_per_s": (generated + sum(map(len, prompts))) / elapsed,
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--systems", default="vattention,paged,hf")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--quick", action="store_true", help="tiny preset on the CPU (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.model, args.num_requests, args.prompt_len, args.output_len = "tiny", 8, 32, 8
        args.max_num_seqs, args.max_batched_tokens, args.dtype = 8, 64, "float32"
        args.systems = ",".join(s for s in args.systems.split(",") if s != "hf")
    info = {
        "python": platform.python_version(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }  # fmt: skip
    config = {k: v for k, v in vars(args).items() if k != "out"}
    print("# bench_throughput")
    print("config:", json.dumps({**config, **info}))
    prompts = make_prompts(args.num_requests, args.prompt_len, get_preset(args.model).vocab_size)
    results = []
    for system in args.systems.split(","):
        try:
            r = run_hf(args, prompts) if system == "hf" else run_ours(args, system, prompts)
        except Exception as e:  # report and go on with the other systems
            r = {"system": system, "error": f"{type(e).__name__}: {e}"}
            _free()
        results.append(r)
        print(json.dumps(r))
    lines = [
        "# Offline throughput\n",
        f"Command: `{' '.join(sys.argv)}`  \nEnvironment: `{json.dumps(info)}`  \n"
        f"Workload: {args.num_requests} requests x {args.prompt_len} prompt tokens x "
        f"{args.output_len} output tokens, greedy, ignore EOS, model {args.model} "
        f"(random weights, {args.dtype}).\n",
        "| system | seconds | output tok/s | total tok/s | preemptions |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | error: {r['error'][:120]} | | | |")
        else:
            lines.append(
                f"| {r['system']} | {r['seconds']:.2f} | {r['output_tok_per_s']:.0f} | "
                f"{r['total_tok_per_s']:.0f} | {r.get('preemptions', '')} |"
            )
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"info": info, "config": config, "results": results}, f, indent=2)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
