"""Prefix caching through `LLM` on the CPU: outputs with sharing equal outputs without it.

A tiny random Llama (fp32) over the vAttention cache with 4 KiB pages (a few tokens a page;
shared by mapping) and over the paged cache with 4-token blocks (shared through block tables), so
prompts share several pages: a common system prompt with distinct suffixes, prompts diverging
inside a page, repeated prompts, a multi-turn conversation that resends the previous turn and
its answer, and a budget tight enough to preempt sharers and evict idle pages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.llm_helpers import hf_greedy, save_tiny
from vattention import LLM, SamplingParams

NEW = 6
PARAMS = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


CACHES = ["vattention", pytest.param("paged", marks=pytest.mark.paged)]


def _llm(path: Path, share: bool, kv_cache: str = "vattention", **kw: object) -> LLM:
    opts: dict[str, object] = dict(
        dtype="float32", device="cpu", max_model_len=128, max_num_seqs=3,
        max_num_batched_tokens=24, kv_page_size=4096, block_size=4, kv_cache=kv_cache,
        enable_prefix_caching=share,
    )  # fmt: skip
    opts.update(kw)
    return LLM(str(path), **opts)  # type: ignore[arg-type]


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    system = torch.randint(3, 120, (21,), generator=gen).tolist()
    out = [system + torch.randint(3, 120, (n,), generator=gen).tolist() for n in (1, 4, 9, 2)]
    out.append(list(out[1]))  # the same prompt again
    out.append(system[:10] + [7, 8, 9, 10, 11])  # diverges inside the third page
    out.append(system[:8])  # ends on a page boundary: its last page must still be computed
    return out


def _run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def _clean(llm: LLM) -> None:
    cache = llm.engine.cache
    cache.check_integrity()
    assert cache.stats().slots_used == 0


@pytest.mark.parametrize("kv_cache", CACHES)
def test_sharing_gives_the_same_outputs(tmp_path: Path, kv_cache: str) -> None:
    hf = save_tiny("llama", tmp_path / "m")
    batch = _prompts()
    with _llm(tmp_path / "m", share=False, kv_cache=kv_cache) as llm:
        want = _run(llm, batch)
    assert want[:2] == [hf_greedy(hf, p, NEW) for p in batch[:2]]
    with _llm(tmp_path / "m", share=True, kv_cache=kv_cache) as llm:
        first = _run(llm, batch)  # queued requests hit what earlier ones published
        prefix = llm.engine.scheduler.prefix
        assert prefix is not None and prefix.hit_tokens > 0
        hits = prefix.hit_tokens
        again = _run(llm, batch)  # every prompt's full pages are cached now
        assert prefix.hit_tokens - hits >= sum((len(p) - 1) // 4 * 4 for p in batch) - 8
        stats = llm.engine.cache.stats()
        assert stats.prefix_bytes > 0 and stats.prefix_hit_pages > 0
        _clean(llm)
    assert first == want and again == want


@pytest.mark.parametrize("kv_cache", CACHES)
def test_multi_turn_reuses_the_previous_answer(tmp_path: Path, kv_cache: str) -> None:
    save_tiny("llama", tmp_path / "m")
    turn1 = _prompts()[2]
    with _llm(tmp_path / "m", share=False, kv_cache=kv_cache) as llm:
        answer = _run(llm, [turn1])[0]
        turn2 = turn1 + answer + [17, 18, 19]
        want = _run(llm, [turn2])
    with _llm(tmp_path / "m", share=True, kv_cache=kv_cache) as llm:
        assert _run(llm, [turn1])[0] == answer
        prefix = llm.engine.scheduler.prefix
        assert prefix is not None
        before = prefix.hit_tokens
        assert _run(llm, [turn2]) == want
        # the first turn's prompt and all but its last answer token have K/V: whole pages
        per = prefix.per_page  # tokens a shared page (or block) holds
        assert prefix.hit_tokens - before == (len(turn1) + len(answer) - 1) // per * per
        _clean(llm)


@pytest.mark.parametrize("kv_cache", CACHES)
def test_tight_budget_preempts_sharers_and_evicts_idle_pages(tmp_path: Path, kv_cache: str) -> None:
    save_tiny("llama", tmp_path / "m")
    batch = _prompts() * 2
    with _llm(tmp_path / "m", share=False, kv_cache=kv_cache) as llm:
        want = _run(llm, batch)
    # 24 x 4 KiB (2 x 12 pages; 24 blocks of 4 tokens): a few requests' worth, so sharers are
    # preempted and idle pages evicted
    with _llm(tmp_path / "m", share=True, kv_cache=kv_cache, kv_cache_memory=24 * 4096) as llm:
        got = _run(llm, batch)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.scheduler.prefix is not None
        assert llm.engine.scheduler.prefix.hit_tokens > 0
        _clean(llm)
    assert got == want


def test_prefix_caching_needs_whole_tokens_per_page(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", num_hidden_layers=3)  # 768 bytes a token (cross-layer)
    with pytest.raises(ValueError, match="whole tokens per page"):
        _llm(tmp_path / "m", share=True)
    _llm(tmp_path / "m", share=False).close()  # without prefix caching any page size works


def test_prefix_caching_is_on_by_default_where_the_cache_can_share(tmp_path: Path) -> None:
    """Default (None): on wherever pages hold whole tokens; off, with the reason, where a page
    would split a token (3 KV heads x 16 dims x fp32 = 192 bytes, which no power-of-two page
    divides); True there is a clear error; False turns it off."""
    save_tiny("llama", tmp_path / "m")
    opts: dict[str, object] = dict(dtype="float32", device="cpu", max_model_len=128,
                                   max_num_seqs=2, kv_page_size=4096)  # fmt: skip
    with LLM(str(tmp_path / "m"), **opts) as llm:  # type: ignore[arg-type]
        assert llm.engine.scheduler.prefix is not None
        assert llm.engine.prefix_caching_off_reason is None
    with LLM(str(tmp_path / "m"), enable_prefix_caching=False, **opts) as llm:  # type: ignore[arg-type]
        assert llm.engine.scheduler.prefix is None
        assert "False" in str(llm.engine.prefix_caching_off_reason)
    save_tiny("llama", tmp_path / "odd", num_attention_heads=3, num_key_value_heads=3,
              hidden_size=48)  # fmt: skip
    with LLM(str(tmp_path / "odd"), **opts) as llm:  # type: ignore[arg-type]
        assert llm.engine.scheduler.prefix is None
        assert "whole tokens" in str(llm.engine.prefix_caching_off_reason)
        out = llm.generate([[5, 6, 7, 8]], PARAMS, use_tqdm=False)  # still serves
        assert len(out[0].token_ids) == NEW
    with pytest.raises(ValueError, match="enable_prefix_caching=True.*whole tokens"):
        LLM(str(tmp_path / "odd"), enable_prefix_caching=True, **opts)  # type: ignore[arg-type]
    with LLM(str(tmp_path / "odd"), kv_cache="paged", block_size=4, **opts) as llm:  # type: ignore[arg-type]
        assert llm.engine.scheduler.prefix is not None  # blocks hold whole tokens by definition


def test_lookups_count_each_admission_once() -> None:
    """A request refused for memory looks the cache up again at the next step, but only the
    admission counts: after a step that admits one request and refuses the next, the queries
    are the first one's tokens."""
    from tests.kvcache.helpers import CPU_PAGE, make_spec
    from vattention import VirtualKVCache
    from vattention.engine.request import Request
    from vattention.engine.scheduler import Scheduler
    from vattention.engine.scheduling import SchedulerConfig

    spec = make_spec("cpu", num_layers=4)  # 512 bytes a token and buffer: 128 a page
    with VirtualKVCache(spec, "cpu", budget_bytes=6 * CPU_PAGE, lookahead_tokens=0) as cache:
        per_page = cache.tokens_per_page  # 6 pages = 3 page-steps of K and V
        config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8 * per_page,
                                 max_model_len=700, enable_prefix_caching=True)  # fmt: skip
        sched = Scheduler(config, cache)
        a = Request("a", [7] * (2 * per_page), SamplingParams(max_tokens=2))
        b = Request("b", [9] * (2 * per_page), SamplingParams(max_tokens=2))
        sched.add_request(a)
        sched.add_request(b)
        out = sched.schedule()
        assert [row.request.request_id for row in out.scheduled] == ["a"]  # b: no memory
        assert sched.prefix is not None and sched.prefix.query_tokens == 2 * per_page
        out = sched.schedule()  # a decodes into its third page; b is refused again
        assert [row.request.request_id for row in out.scheduled] == ["a"]
        assert sched.prefix.query_tokens == 2 * per_page


def test_hot_system_prompt_is_shared_through_a_segment(tmp_path: Path) -> None:
    """Eight requests behind one 40-token system prompt (many pages), four at a time: once two
    slots map the prompt, later admissions map it through one segment (a device copy mapped
    in one call per buffer); outputs equal those without sharing, and HF's."""
    hf = save_tiny("llama", tmp_path / "m")
    gen = torch.Generator().manual_seed(11)
    system = torch.randint(3, 120, (40,), generator=gen).tolist()
    batch = [system + torch.randint(3, 120, (n,), generator=gen).tolist() for n in range(1, 9)]
    with _llm(tmp_path / "m", share=False, max_num_seqs=4, max_num_batched_tokens=64) as llm:
        want = _run(llm, batch)
    assert want[:2] == [hf_greedy(hf, p, NEW) for p in batch[:2]]
    with _llm(tmp_path / "m", share=True, max_num_seqs=4, max_num_batched_tokens=64) as llm:
        _run(llm, batch[:1])  # publishes the system prompt's pages
        got = _run(llm, batch)
        stats = llm.engine.cache.stats()
        assert stats.segment_bytes >= 40 * 2 * 2 * 2 * 32 * 4  # K and V of its 40 tokens
        _clean(llm)
    assert got == want
