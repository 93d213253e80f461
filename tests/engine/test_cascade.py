"""Cascade decoding in the engine (`cascade_attention=True`): requests behind one prompt
prefix have it attended once per decode step, read from one sharer's pages.

Greedy outputs with it equal those without it and HF's, on both caches, in eager decode steps
and in (emulated) decode graphs, and decode steps did take the cascade path. On the CPU the
Triton kernels run under the interpreter; `test_cascade_decode.py` checks the kernels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_helpers import hf_greedy, save_tiny

from vattention import LLM, SamplingParams
from vattention.attention import create_backend
from vattention.engine import cascade as cascade_module
from vattention.engine.cascade import plan_cascade
from vattention.engine.cuda_graphs import cascade_sizes
from vattention.engine.model_runner import ModelRunner
from vattention.engine.sampler import Sampler

NEW = 4


def shared_prompts(n: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, 128, (prefix_len,), generator=gen).tolist()
    return [
        prefix + torch.randint(1, 128, (int(torch.randint(3, 20, (), generator=gen)),),
                               generator=gen).tolist()
        for _ in range(n)
    ]  # fmt: skip


def _llm(path: Path, kv_cache: str, cascade: bool, graphs: bool, **opts: object) -> LLM:
    llm = LLM(
        str(path), kv_cache=kv_cache, dtype="float32", device="cpu", max_model_len=128,
        max_num_seqs=9, max_num_batched_tokens=128, kv_page_size=4096, block_size=8,
        enable_prefix_caching=True, cascade_attention=cascade, **opts,
    )  # fmt: skip
    eng = llm.engine
    c = eng.model_config
    if kv_cache == "vattention":
        opts = {"decode": "triton_decode", "prefill": "triton"}
        eng.attn = create_backend(
            "auto", eng.cache, c.num_heads, c.num_kv_heads, c.head_dim, **opts
        )
    else:
        eng.attn = create_backend("pa_triton", eng.cache, c.num_heads, c.num_kv_heads, c.head_dim)
    dummy = None
    if graphs:
        from vattention.engine.scheduling import SchedulerConfig

        sched = eng.scheduler.config
        eng.scheduler.config = SchedulerConfig(
            8, sched.max_num_batched_tokens, eng.max_model_len,
            enable_prefix_caching=sched.enable_prefix_caching,
        )  # fmt: skip  # one slot for the dummy
        dummy = eng.cache.alloc_slot()
        eng.cache.ensure(dummy, 1)
    eng.runner = ModelRunner(
        eng.model, eng.cache, eng.attn, Sampler(seed=0), eng.device, eng.max_model_len,
        graph_sizes=[4, 8] if graphs else (), dummy_slot=dummy, emulate_graphs=graphs,
        cascade=cascade,
    )  # fmt: skip
    return llm


@pytest.mark.parametrize(
    ("kv_cache", "graphs", "layout"),
    [
        ("vattention", False, None),
        ("vattention", True, None),
        ("vattention", False, "per_layer"),  # a prefix row per layer's page
        ("vattention", True, "cross_layer"),  # K and V pages apart
        pytest.param("paged", False, None, marks=pytest.mark.paged),
        pytest.param("paged", True, None, marks=pytest.mark.paged),
    ],
)
def test_cascade_matches_plain_decoding_and_hf(
    tmp_path: Path, kv_cache: str, graphs: bool, layout: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The first request caches the prefix; then 8 requests behind it (a hot prefix: the
    vAttention cache moves it into one segment, which every later request maps first)."""
    monkeypatch.setattr(cascade_module, "CASCADE_MIN_TOKENS", 32)  # tiny prompts
    hf = save_tiny("llama", tmp_path / "m", max_position_embeddings=512, num_hidden_layers=1)
    batch = shared_prompts(8, 48)
    want = [hf_greedy(hf, p, NEW) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    got = {}
    for cascade in (False, True):
        opts = {"kv_layout": layout} if layout else {}
        with _llm(tmp_path / "m", kv_cache, cascade, graphs, **opts) as llm:
            llm.generate(batch[:1], params, use_tqdm=False)  # caches the prefix
            outs = llm.generate(batch, params, use_tqdm=False)
            got[cascade] = [o.token_ids for o in outs]
            steps = llm.engine.runner.cascade_steps
            if graphs:  # a second set of decode graphs, replayed only for cascade steps
                assert sorted(llm.engine.runner.graphs.cascade_replays) == (
                    [4, 8] if cascade else []
                )
            if kv_cache == "vattention":
                llm.engine.cache.check_integrity()
        assert (steps > 0) == cascade, steps
    assert got[True] == got[False] == want


def test_plan_needs_enough_rows_and_tokens() -> None:
    """The cache's largest group is kept only with enough members whose own tokens go past
    the prefix, and a long enough prefix; the leader is a slot (contiguous) or a row (paged)."""

    class Cache:
        def __init__(self, found: tuple[int, list[int]] | None) -> None:
            self.found = found

        def shared_prefix(self, slots: list[int]) -> tuple[int, list[int]] | None:
            return self.found

    slots, lens = [7, 3, 5, 9, 2], [300, 300, 257, 400, 300]
    plan = plan_cascade(Cache((256, [1, 2, 3, 4])), slots, lens, paged=False)
    assert plan is not None
    assert plan[0].tolist() == [0, 256, 256, 256, 256] and plan[1:] == (256, 3)
    assert plan_cascade(Cache((256, [1, 2, 3, 4])), slots, lens, paged=True)[2] == 1  # type: ignore[index]
    assert plan_cascade(Cache((300, [0, 1, 2, 3, 4])), slots, lens, paged=False) is None  # 2 past
    assert plan_cascade(Cache((128, [0, 1, 2, 3, 4])), slots, lens, paged=False) is None  # short
    assert plan_cascade(Cache(None), slots, lens, paged=False) is None


def test_cascade_graph_sizes() -> None:
    """Powers of two from the minimum group up to the largest decode bucket, which is kept so
    every step with enough rows has a cascade graph; none below the minimum."""
    assert cascade_sizes([1, 2, 4, 8, 16, 24, 32, 40]) == [4, 8, 16, 32, 40]
    assert cascade_sizes([1, 2, 4, 8, 16, 24, 32]) == [4, 8, 16, 32]
    assert cascade_sizes([1, 2, 4, 8, 256]) == [4, 8, 16, 32, 64, 128, 256]
    assert cascade_sizes([1, 2]) == []
    assert cascade_sizes([]) == []
