"""GPU: the start-up memory profile sizes a KV budget that long prompts run in without OOM.

llama-3-8b (random weights, bf16) with the default `gpu_memory_utilization`, a 16K-token step
budget and prompts of 1K-7K tokens: the configuration whose prefill step ran out of device
memory under the old rule (free memory times the utilization, minus a guess). Both caches; every
request must finish with its tokens, and torch's memory may grow during the run by no more than
the profiled step peak plus the margin (the graphs and the KV cache exist before the run).
"""

from __future__ import annotations

import gc

import pytest
import torch

from vattention import LLM, SamplingParams
from vattention.engine.memory_profile import MARGIN

pytestmark = pytest.mark.gpu
NEW = 8


@pytest.mark.parametrize("kv_cache", ["paged", "vattention"])
def test_llama3_8b_long_prompts_run_in_the_profiled_budget(kv_cache: str) -> None:
    llm = LLM(
        "llama-3-8b", load_format="dummy", dtype="bfloat16", kv_cache=kv_cache,
        max_num_batched_tokens=16384, max_model_len=8192, max_num_seqs=64,
    )  # fmt: skip
    try:
        prof = llm.engine.memory_profile
        assert prof is not None and prof.step_peak > 0 and prof.graph_reserve > 0
        assert prof.kv_budget > 0
        print(kv_cache, prof.describe())
        gen = torch.Generator().manual_seed(0)
        vocab = llm.engine.model_config.vocab_size
        lengths = torch.randint(1024, 7 * 1024 + 1, (16,), generator=gen).tolist()
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
        params = SamplingParams(max_tokens=NEW, ignore_eos=True, detokenize=False)
        torch.cuda.synchronize()
        reserved = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        outs = llm.generate(prompts, params, use_tqdm=False)
        growth = torch.cuda.max_memory_reserved() - reserved
        assert [len(o.token_ids) for o in outs] == [NEW] * len(prompts)
        assert all(o.outputs[0].finish_reason == "length" for o in outs)
        assert [len(o.prompt_token_ids) for o in outs] == lengths
        print(kv_cache, f"run grew torch's memory by {growth / (1 << 30):.2f} GiB")
        assert growth <= prof.step_peak + MARGIN, (growth, prof)
    finally:
        llm.close()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
