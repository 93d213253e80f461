"""Where a generate() step spends GPU time: torch.profiler over a short run of the engine.

    python benchmarks/profile_engine.py --num-requests 64 --out /tmp/prof

Prints the top CUDA kernels by total time for the whole run (warm-up excluded) and writes the
table to `--out`. A diagnostic, not a benchmark: profiling adds overhead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vattention import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--kv-cache", default="vattention")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", kv_cache=args.kv_cache,
              max_model_len=args.prompt_len + args.output_len + 16, max_num_seqs=256,
              max_num_batched_tokens=16384)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 1000, (args.num_requests, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=30, max_name_column_width=70
    )
    print(f"wall {wall:.3f} s for {args.num_requests} x ({args.prompt_len} + {args.output_len})")
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write(table)
    llm.close()


if __name__ == "__main__":
    main()
