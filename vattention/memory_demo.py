"""`vattention memory-demo`: watch physical memory follow requests as they grow and finish.

Simulates a serving loop on a real `VirtualKVCache` (the CPU backend by default, so it runs
anywhere): requests arrive, decode one token per step under a `step_async` look-ahead, finish
and hand their slot back; the table shows mapped vs live bytes, deferred reclamation and the
pool after each step.
"""

from __future__ import annotations

import random

import torch

from vattention.kvcache.spec import KVCacheSpec
from vattention.kvcache.virtual import VirtualKVCache
from vattention.memory.errors import OutOfKVMemory


def run_demo(
    device: str = "cpu",
    steps: int = 60,
    seed: int = 0,
    layout: str = "cross_layer",
    budget_mib: int = 256,
    print_every: int = 5,
) -> dict[str, int]:
    rng = random.Random(seed)
    spec = KVCacheSpec(
        num_layers=8,
        num_kv_heads=8,
        head_dim=128,
        max_slots=16,
        max_seq_len=4096,
        dtype=torch.bfloat16,
        layout=layout,
        page_size=2 << 20,
    )
    mib = 1 << 20
    with VirtualKVCache(spec, device, budget_bytes=budget_mib * mib, lookahead_tokens=128) as cache:
        print(
            f"KV cache: {spec.num_layers} layers x {spec.num_kv_heads} KV heads x {spec.head_dim} "
            f"({spec.dtype}), {spec.max_slots} slots x {spec.max_seq_len} tokens, layout {layout}"
        )
        print(
            f"reserved {cache.layout.total_bytes / mib:,.0f} MiB of virtual memory; page "
            f"{cache.page_size // 1024} KiB = {cache.layout.tokens_per_page:.0f} tokens of every layer; "
            f"budget {budget_mib} MiB"
        )
        print(
            f"{'step':>4} {'reqs':>4} {'tokens':>7} {'live MiB':>9} {'mapped MiB':>10} "
            f"{'frag':>6} {'free-slot MiB':>13} {'pool MiB':>8} {'maps':>5} {'unmaps':>6}"
        )
        running: dict[int, list[int]] = {}  # slot -> [length, target]
        served = preempted = 0
        for step in range(steps):
            if rng.random() < 0.5 and cache.num_free_slots:
                slot = cache.alloc_slot()
                prompt = rng.randint(64, 1500)
                try:
                    cache.ensure(slot, prompt)
                    running[slot] = [prompt, prompt + rng.randint(20, 600)]
                except OutOfKVMemory:
                    cache.free_slot(slot)
                    preempted += 1
            for slot, (length, target) in list(running.items()):
                grown = min(length + 32, target)
                running[slot][0] = grown
                if grown >= target:
                    cache.free_slot(slot)  # its pages stay mapped for the next request
                    del running[slot]
                    served += 1
            try:
                cache.step_async({s: r[0] for s, r in running.items()})
                cache.wait()
            except OutOfKVMemory:
                slot = max(running)  # preempt the newest request
                cache.free_slot(slot)
                del running[slot]
                preempted += 1
            if step % print_every == 0 or step == steps - 1:
                st = cache.stats()
                print(
                    f"{step:>4} {st.slots_used:>4} {sum(r[0] for r in running.values()):>7} "
                    f"{st.live_bytes / mib:>9.1f} {st.mapped_bytes / mib:>10.1f} "
                    f"{st.internal_fragmentation:>6.1%} {st.reclaimable_bytes / mib:>13.1f} "
                    f"{st.pool_free_bytes / mib:>8.1f} {st.map_calls:>5} {st.unmap_calls:>6}"
                )
            cache.check_integrity()
        released = cache.trim()
        print(
            f"served {served} requests, {preempted} turned away or preempted for memory; "
            f"trim() released {released / mib:.0f} MiB; still mapped for running requests: "
            f"{cache.stats().mapped_bytes / mib:.0f} MiB"
        )
        return {"served": served, "preempted": preempted}
