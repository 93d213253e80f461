"""Step graphs (`engine/cuda_graphs.py`): static buffers, padding and the fixed-shape mixed plan.

On the CPU the graphs are emulated (`emulate_graphs`: the same static buffers, padding rows
and `meta.mixed` plan, with the forward pass run in place of each replay) and the Triton
kernels run under the interpreter, so these tests check everything but the capture itself
against HF greedy output. `test_llm_gpu.py` checks real graphs on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_helpers import hf_greedy, prompts, save_tiny

from vattention import LLM, SamplingParams
from vattention.attention import create_backend
from vattention.engine.cuda_graphs import mixed_token_sizes
from vattention.engine.model_runner import ModelRunner
from vattention.engine.sampler import Sampler
from vattention.engine.scheduling import SchedulerConfig

NEW = 10


def _graph_llm(path: Path, kv_cache: str, decode_graphs: bool = True) -> LLM:
    llm = LLM(
        str(path), kv_cache=kv_cache, dtype="float32", device="cpu", max_model_len=128,
        max_num_seqs=5, max_num_batched_tokens=48, kv_page_size=64 * 1024, block_size=16,
        enforce_eager=True,
    )  # fmt: skip
    eng = llm.engine
    c = eng.model_config
    eng.scheduler.config = SchedulerConfig(4, 48, eng.max_model_len)  # one slot for the dummy
    dummy = eng.cache.alloc_slot()
    eng.cache.ensure(dummy, 1)
    if kv_cache == "vattention":
        opts = {"decode": "triton_decode", "prefill": "triton"}
        eng.attn = create_backend(
            "auto", eng.cache, c.num_heads, c.num_kv_heads, c.head_dim, **opts
        )
    else:
        eng.attn = create_backend("pa_triton", eng.cache, c.num_heads, c.num_kv_heads, c.head_dim)
    eng.runner = ModelRunner(
        eng.model, eng.cache, eng.attn, Sampler(seed=0), eng.device, eng.max_model_len,
        graph_sizes=[1, 2, 4] if decode_graphs else (), dummy_slot=dummy,
        mixed_sizes=[16, 32, 64], max_num_seqs=4, max_graph_prefills=2, emulate_graphs=True,
    )  # fmt: skip
    return llm


@pytest.mark.parametrize("kv_cache", ["vattention", pytest.param("paged", marks=pytest.mark.paged)])
def test_mixed_graphs_match_hf(tmp_path: Path, kv_cache: str) -> None:
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(7, seed=5, low=3, high=40)
    want = [hf_greedy(hf, p, NEW) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    with _graph_llm(tmp_path / "m", kv_cache) as llm:
        outs = llm.generate(batch, params, use_tqdm=False)
        steps = llm.engine.runner.graph_steps
        llm.engine.cache.check_integrity()
    assert [o.token_ids for o in outs] == want
    assert steps["mixed"] > 0 and steps["decode"] > 0, steps


def test_mixed_graphs_alone_with_async_placeholders(tmp_path: Path) -> None:
    """Mixed graphs only (decode steps eager): placeholders fed from the previous step."""
    hf = save_tiny("llama", tmp_path / "m", seed=2)
    batch = prompts(5, seed=9, low=2, high=30)
    want = [hf_greedy(hf, p, NEW) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    with _graph_llm(tmp_path / "m", "vattention", decode_graphs=False) as llm:
        assert llm.engine.config.async_scheduling
        outs = llm.generate(batch, params, use_tqdm=False)
        steps = llm.engine.runner.graph_steps
    assert [o.token_ids for o in outs] == want
    assert steps["mixed"] > 0, steps


def test_mixed_token_sizes() -> None:
    assert mixed_token_sizes(8192, 256, 2048) == [512, 1024, 2048]
    assert mixed_token_sizes(8192, 8, 256) == [16, 32, 64, 128, 256]
    assert mixed_token_sizes(8192, 256, 0) == []
    assert mixed_token_sizes(300, 8, 2048) == [16, 32, 64, 128, 256, 301]  # the budget's last
    assert mixed_token_sizes(64, 64, 2048) == []  # no step mixes more than decodes
    sizes = mixed_token_sizes(4096, 100, 2048)
    assert sizes == sorted(sizes) and sizes[0] > 100 and sizes[-1] <= 2048


def test_no_decode_graphs_for_a_backend_that_reads_host_lists(tmp_path: Path) -> None:
    """A captured decode step's host lists describe padding (the padding slot at full length):
    a backend that reads them (per-request SDPA here) would attend over that slot in every row,
    so the runner captures no decode graph for it and runs those steps eagerly."""
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(4, seed=5, low=3, high=30)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    with LLM(
        str(tmp_path / "m"), attention_backend="torch_sdpa_ref", dtype="float32", device="cpu",
        max_model_len=128, max_num_seqs=5, max_num_batched_tokens=48, kv_page_size=64 * 1024,
        enforce_eager=True,
    ) as llm:  # fmt: skip
        eng = llm.engine
        assert not eng.attn.supports_decode_graphs
        eng.scheduler.config = SchedulerConfig(4, 48, eng.max_model_len)
        dummy = eng.cache.alloc_slot()
        eng.cache.ensure(dummy, 1)
        eng.runner = ModelRunner(
            eng.model, eng.cache, eng.attn, Sampler(seed=0), eng.device, eng.max_model_len,
            graph_sizes=[1, 2, 4], dummy_slot=dummy, emulate_graphs=True,
        )  # fmt: skip
        assert eng.runner.graphs is None
        outs = llm.generate(batch, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, NEW) for p in batch]
