"""The paged backends drive the whole engine (chunked prefill, mixed prefill+decode batches,
CPU, fp32) to exactly Hugging Face's greedy tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from llm_helpers import hf_greedy, prompts, save_tiny  # noqa: E402

from vattention import LLM, SamplingParams  # noqa: E402


@pytest.mark.parametrize("backend", ["paged_triton", "paged_flex"])
def test_engine_greedy_matches_hf(tmp_path: Path, backend: str) -> None:
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(3, seed=3, low=20, high=36)
    want = [hf_greedy(hf, p, 6) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(str(tmp_path / "m"), kv_cache="paged", dtype="float32", device="cpu",
              max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, block_size=16,
              attention_backend=backend)  # fmt: skip
    with llm:
        outs = llm.generate(batch, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == want
