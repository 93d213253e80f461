"""Capacity at a fixed KV budget: the vAttention cache runs as many requests at once as the paged
baseline and preempts no more, when a page holds as many tokens as a block.

Same trace (uneven prompts and outputs, more demand than memory), same budget, same engine
settings; the only difference is the cache. At equal granularity the look-ahead and the pages
mapped ahead of the next step must cost no capacity: they yield before any admission waits or
any request is preempted. (With 2 MiB pages a cross_layer page holds 32 tokens of Llama-3-8B
against vLLM's 16-token blocks: that coarser granularity, not the mapping, then costs
capacity. The `cross_layer_kv` layout puts K and V in one page, 16 tokens: equal again.)
"""

from __future__ import annotations

import pytest
import torch

from vattention import LLM, SamplingParams


def _run(
    kv_cache: str, budget: int, page: int, layout: str = "cross_layer"
) -> tuple[int, int, int]:
    gen = torch.Generator().manual_seed(0)
    trace = [
        (torch.randint(5, 200, (int(torch.randint(20, 121, (), generator=gen)),),
                       generator=gen).tolist(), int(torch.randint(10, 41, (), generator=gen)))
        for _ in range(32)
    ]  # fmt: skip
    with LLM("tiny", load_format="dummy", dtype="float32", device="cpu", kv_cache=kv_cache,
             max_num_seqs=16, max_num_batched_tokens=256, max_model_len=256,
             kv_page_size=page, block_size=16, kv_cache_memory=budget,
             kv_layout=layout) as llm:  # fmt: skip
        params = [SamplingParams(max_tokens=o, ignore_eos=True, detokenize=False) for _, o in trace]
        outs = llm.generate([ids for ids, _ in trace], params, use_tqdm=False)
        sched = llm.engine.scheduler
        assert [len(o.token_ids) for o in outs] == [o for _, o in trace]
        return sched.max_running, sched.num_preemptions, len(outs)


# tiny preset, fp32: 512 bytes of K (and of V) a token, so 16 tokens a page with 8 KiB pages
# (cross_layer: K and V pages apart) or with 16 KiB pages (cross_layer_kv: K and V together)
@pytest.mark.parametrize(
    ("layout", "page"), [("cross_layer", 8 << 10), ("cross_layer_kv", 16 << 10)]
)
@pytest.mark.parametrize("budget", [320 << 10, 640 << 10])
def test_vattention_capacity_equals_paged_at_equal_granularity(
    budget: int, layout: str, page: int
) -> None:
    v_running, v_preempt, v_out = _run("vattention", budget, page, layout)
    p_running, p_preempt, p_out = _run("paged", budget, 8 << 10)
    assert v_preempt > 0  # the budget binds
    assert v_running >= p_running and v_preempt <= p_preempt
    assert v_out == p_out == 32
