"""Memory-API calls a multi-turn chat costs the vAttention cache with prefix caching.

    python benchmarks/count_prefix_calls.py [--conversations 16] [--turns 4]

Each turn resends every conversation with its previous answer and new user tokens (tiny preset,
dummy weights, CPU by default). Prints map / unmap / set-access calls per turn and the prompt
tokens served from the prefix cache. The counts do not depend on the device: they show how much
mapping a turn asks for (a turn whose request gets back the slot that still maps its
conversation maps only its new tokens' pages).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vattention import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    llm = LLM("tiny", load_format="dummy", dtype="float32", device=args.device,
              max_model_len=2048, max_num_seqs=args.conversations, max_num_batched_tokens=512,
              kv_page_size=16 * 1024 if args.device == "cpu" else None)  # fmt: skip
    engine = llm.engine
    gen = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(10, 500, (n,), generator=gen).tolist()

    convs = [
        tokens(int(torch.randint(100, 300, (), generator=gen))) for _ in range(args.conversations)
    ]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, detokenize=False)
    print(f"config: {vars(args)}, tokens a page: {engine.cache.tokens_per_page}")
    print("| turn | map calls | unmap calls | set-access calls | prompt tokens | from cache |")
    print("|---|---|---|---|---|---|")
    for turn in range(args.turns):
        before, hits = engine.cache.stats(), engine.scheduler.prefix.hit_tokens
        outs = llm.generate(convs, params, use_tqdm=False)
        after = engine.cache.stats()
        print(f"| {turn} | {after.map_calls - before.map_calls} | "
              f"{after.unmap_calls - before.unmap_calls} | "
              f"{after.set_access_calls - before.set_access_calls} | "
              f"{sum(len(c) for c in convs)} | {engine.scheduler.prefix.hit_tokens - hits} |")  # fmt: skip
        convs = [c + list(o.token_ids) + tokens(40) for c, o in zip(convs, outs, strict=True)]
    llm.close()


if __name__ == "__main__":
    main()
