"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`), end to end on the CPU: each
prompt position's value and top alternatives equal `log_softmax` of Hugging Face's uncached
forward logits, over one step or many (chunked prefill), with prefix caching on, mixed with
requests that do not ask, through preemptions, with `n > 1`, in bounded slices, and eager
where the step would otherwise replay a (CPU-emulated) graph. The scheduler's bookkeeping
(positions kept across preemption, none recorded twice) is also checked on a fake cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FakeKVCache
from llm_helpers import hf_greedy, prompts, save_tiny

from vattention import LLM, SamplingParams
from vattention.engine import logprobs as logprobs_module
from vattention.engine.logprobs import HostLogprobs
from vattention.engine.outputs import RequestOutput
from vattention.engine.request import Request
from vattention.engine.scheduler import Scheduler
from vattention.engine.scheduling import SchedulerConfig, SchedulerOutput

CACHES = ["vattention", pytest.param("paged", marks=pytest.mark.paged)]
ATOL = 2e-4  # float32 logits through two implementations (different summation orders)


def _llm(path: Path, kv_cache: str = "vattention", **kw: Any) -> LLM:
    opts: dict[str, Any] = dict(
        kv_cache=kv_cache, dtype="float32", device="cpu", max_model_len=128, max_num_seqs=4,
        max_num_batched_tokens=32, kv_page_size=64 * 1024, block_size=16,
    )  # fmt: skip
    opts.update(kw)
    return LLM(str(path), **opts)


def hf_logprobs(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """`[len(prompt), vocab]` log-softmax of HF's uncached forward logits (row i predicts
    token i + 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check_prompt_logprobs(out: RequestOutput, ref: torch.Tensor, k: int) -> None:
    """`out.prompt_logprobs` is aligned with the prompt, None first, and equals `ref`: each
    prompt token's value and its k most likely alternatives (ids where values are apart)."""
    ids = out.prompt_token_ids
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        e = got[i]
        assert e is not None and e.token_id == ids[i]
        assert e.logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=ATOL), i
        top = ref[i - 1].topk(k + 1)
        values = top.values.tolist()
        assert len(e.top) == k
        for j, (tid, lp) in enumerate(e.top):
            assert lp == pytest.approx(values[j], abs=ATOL), (i, j)
            apart = all(abs(values[j] - values[m]) > 1e-3 for m in (j - 1, j + 1) if m >= 0)
            if apart:  # (a near tie may come out in either order)
                assert tid == top.indices[j].item(), (i, j)


@pytest.mark.parametrize("kv_cache", CACHES)
@pytest.mark.parametrize("budget", [128, 8])  # the whole prompt in one step, or chunks of 8
def test_prompt_logprobs_equal_hf(tmp_path: Path, kv_cache: str, budget: int) -> None:
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(4, seed=4, low=2, high=60)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=3)
    with _llm(tmp_path / "m", kv_cache, max_num_batched_tokens=budget) as llm:
        outs = llm.generate(batch, params, use_tqdm=False)
        assert llm.engine.runner.graph_steps["eager"] > 0
    for p, o in zip(batch, outs, strict=True):
        check_prompt_logprobs(o, hf_logprobs(hf, p), 3)
        assert o.token_ids == hf_greedy(hf, p, 3)


def test_a_one_token_prompt_and_zero_alternatives(tmp_path: Path) -> None:
    """A one-token prompt has only position 0 (None); k = 0 gives each token's own value."""
    hf = save_tiny("llama", tmp_path / "m")
    with _llm(tmp_path / "m") as llm:
        one, two = llm.generate(
            [[7], [7, 9, 11]], SamplingParams(max_tokens=2, prompt_logprobs=0), use_tqdm=False
        )
    assert one.prompt_logprobs == [None]
    check_prompt_logprobs(two, hf_logprobs(hf, [7, 9, 11]), 0)


def test_mixed_with_requests_that_do_not_ask(tmp_path: Path) -> None:
    """In one batch (chunked prefill, async scheduling) the requests that do not ask get
    exactly what they get alone, and no prompt log-probabilities."""
    hf = save_tiny("llama", tmp_path / "m", seed=1)
    batch = prompts(6, seed=8, low=10, high=50)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    asking = dataclasses.replace(plain, prompt_logprobs=2)
    params = [asking if i % 2 else plain for i in range(len(batch))]
    with _llm(tmp_path / "m", max_num_batched_tokens=16) as llm:
        alone = llm.generate(batch, plain, use_tqdm=False)
        mixed = llm.generate(batch, params, use_tqdm=False)
    for i, (p, a, m) in enumerate(zip(batch, alone, mixed, strict=True)):
        assert m.token_ids == a.token_ids == hf_greedy(hf, p, 6)
        la, lm = a.outputs[0].logprobs, m.outputs[0].logprobs
        assert la is not None and lm is not None
        assert [e.token_id for e in la] == [e.token_id for e in lm]
        assert [e.logprob for e in lm] == pytest.approx([e.logprob for e in la], abs=ATOL)
        assert a.prompt_logprobs is None
        if i % 2:
            check_prompt_logprobs(m, hf_logprobs(hf, p), 2)
        else:
            assert m.prompt_logprobs is None


def test_prefix_caching_gives_no_hit_to_a_request_that_asks(tmp_path: Path) -> None:
    """With the prompt's pages cached, a request asking for prompt log-probabilities still
    computes (and gets) every position; with n > 1 only choice 0 computes them, the other
    choices are served from the cache."""
    hf = save_tiny("llama", tmp_path / "m", seed=2)
    prompt = prompts(1, seed=3, low=70, high=71)[0]  # four whole 16-token pages, and more
    ref = hf_logprobs(hf, prompt)
    base = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with _llm(tmp_path / "m") as llm:
        prefix = llm.engine.scheduler.prefix
        assert prefix is not None
        first = llm.generate([prompt], base, use_tqdm=False)[0]
        hits, queries = prefix.hit_tokens, prefix.query_tokens
        again = llm.generate([prompt], base, use_tqdm=False)[0]
        assert prefix.hit_tokens > hits  # the pages are cached
        hits, queries = prefix.hit_tokens, prefix.query_tokens
        (asking,) = llm.generate(
            [prompt], dataclasses.replace(base, prompt_logprobs=1), use_tqdm=False
        )
        assert (prefix.hit_tokens, prefix.query_tokens) == (hits, queries)  # not looked up
        many = llm.generate(
            [prompt], dataclasses.replace(base, n=3, prompt_logprobs=1), use_tqdm=False
        )[0]
        assert prefix.hit_tokens >= hits + 2 * 64  # choices 1 and 2 hit the cached pages
        llm.engine.cache.check_integrity()
    check_prompt_logprobs(asking, ref, 1)
    check_prompt_logprobs(many, ref, 1)
    assert asking.token_ids == first.token_ids == again.token_ids
    assert [c.token_ids for c in many.outputs] == [first.token_ids] * 3


def test_preemption_keeps_each_position_once(tmp_path: Path) -> None:
    """A tight KV budget preempts requests in the middle of their prompts: every prompt still
    gets each position exactly once, equal to HF's."""
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(6, seed=3, low=40, high=70)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=2)
    with _llm(tmp_path / "m", kv_cache_memory=6 * 64 * 1024, max_num_batched_tokens=16) as llm:
        sched = llm.engine.scheduler
        real, partial = sched._preempt, []

        def preempt(r: Request) -> None:
            if r.prompt_logprobs is not None and 1 < len(r.prompt_logprobs) < r.num_prompt_tokens:
                partial.append(r.request_id)
            real(r)

        sched._preempt = preempt  # type: ignore[method-assign]
        outs = llm.generate(batch, params, use_tqdm=False)
        assert sched.num_preemptions > 0 and partial  # some lost their slot mid-prompt
        assert not sched._prompt_logprobs
    for p, o in zip(batch, outs, strict=True):
        check_prompt_logprobs(o, hf_logprobs(hf, p), 2)
        assert o.token_ids == hf_greedy(hf, p, 8)


def test_slices_bound_the_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prompt's logits are computed a slice of rows at a time (at most
    `PROMPT_SLICE_ELEMENTS` float32 values), with the same result."""
    hf = save_tiny("llama", tmp_path / "m")
    prompt = prompts(1, seed=6, low=100, high=101)[0]
    monkeypatch.setattr(logprobs_module, "PROMPT_SLICE_ELEMENTS", 128 * 7)  # 7 rows of 128
    with _llm(tmp_path / "m", max_num_batched_tokens=128) as llm:
        model = llm.engine.model
        real, rows = model.compute_logits, []

        def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
            rows.append(hidden.shape[0])
            return real(hidden)

        model.compute_logits = compute_logits  # type: ignore[method-assign]
        (out,) = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=4),
                              use_tqdm=False)  # fmt: skip
    assert max(rows) <= 7 and sum(rows) >= len(prompt) - 1
    check_prompt_logprobs(out, hf_logprobs(hf, prompt), 4)


def test_steps_with_prompt_rows_run_eagerly(tmp_path: Path) -> None:
    """With (CPU-emulated) decode and mixed graphs, a step holding rows that compute prompt
    log-probabilities runs eagerly; the others still replay graphs; all outputs equal HF's."""
    from test_cuda_graphs import _graph_llm

    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(4, seed=5, low=3, high=30)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    params = [plain, dataclasses.replace(plain, prompt_logprobs=2)] * 2
    with _graph_llm(tmp_path / "m", "vattention") as llm:
        runner = llm.engine.runner
        real, seen = runner.execute, []

        def execute(out: SchedulerOutput, *args: Any, **kwargs: Any) -> Any:
            before = dict(runner.graph_steps)
            result = real(out, *args, **kwargs)
            ran = next(k for k, v in runner.graph_steps.items() if v != before[k])
            seen.append((out.prompt_logprobs is not None, ran))
            return result

        runner.execute = execute  # type: ignore[method-assign]
        outs = llm.generate(batch, params, use_tqdm=False)
    assert any(asked for asked, _ in seen)
    assert all(ran == "eager" for asked, ran in seen if asked)
    assert any(ran != "eager" for asked, ran in seen if not asked)
    for i, (p, o) in enumerate(zip(batch, outs, strict=True)):
        assert o.token_ids == hf_greedy(hf, p, 6)
        if i % 2:
            check_prompt_logprobs(o, hf_logprobs(hf, p), 2)


def test_streamed_outputs_carry_the_whole_prompt(tmp_path: Path) -> None:
    """`step(include_running=True)`: every output of a request that asked carries all its
    prompt positions (they are complete before its first token)."""
    save_tiny("llama", tmp_path / "m")
    prompt = prompts(1, seed=9, low=40, high=41)[0]
    with _llm(tmp_path / "m", max_num_batched_tokens=8) as llm:
        eng = llm.engine
        eng.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=1))
        seen = []
        while eng.has_unfinished_requests():
            seen += eng.step(include_running=True)
    assert len(seen) == 4
    assert all(o.prompt_logprobs is not None and len(o.prompt_logprobs) == 40 for o in seen)


def test_validation() -> None:
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0"):
        SamplingParams(prompt_logprobs=-1)
    for bad in (1.0, "2", True):
        with pytest.raises(TypeError, match="prompt_logprobs must be an int"):
            SamplingParams(prompt_logprobs=bad)  # type: ignore[arg-type]
    choices = SamplingParams(n=3, seed=1, prompt_logprobs=2).choices()
    assert [c.prompt_logprobs for c in choices] == [2, None, None]
    assert [c.seed for c in choices] == [1, 2, 3]


# -- the scheduler's bookkeeping, on a fake cache --------------------------------------------
def _fake_values(out: SchedulerOutput) -> HostLogprobs | None:
    """Prompt 'log-probabilities' that name what they are: -(position) - request number / 10."""
    rows = out.prompt_logprobs
    if rows is None:
        return None
    values, ids = [], []
    for pr in rows:
        r = out.scheduled[pr.row].request
        for pos in range(pr.first, pr.end):
            values.append(-pos - int(r.request_id) / 10)
            ids.append([pos])
    return HostLogprobs(values, ids, [[float(v)] for v in values])


@pytest.mark.parametrize("pipelined", [False, True])
def test_scheduler_records_each_position_once_across_preemption(pipelined: bool) -> None:
    """Chunked prompts under a page budget that forces preemptions mid-prompt, updated in
    order or one step behind (async scheduling): each request records positions 1.. exactly
    once and in order; positions recorded before a preemption are not computed again."""
    cache = FakeKVCache(num_slots=3, num_pages=12, page_size=4, batched=True)
    sched = Scheduler(SchedulerConfig(3, 16, 64), cache)
    reqs = [
        Request(str(i), list(range(1, 25 + 3 * i)), SamplingParams(max_tokens=3, prompt_logprobs=1))
        for i in range(3)
    ]  # fmt: skip
    plain = Request("9", list(range(1, 20)), SamplingParams(max_tokens=3))
    for r in [*reqs, plain]:
        sched.add_request(r)
    pending: list[SchedulerOutput] = []
    preempted_mid_prompt = 0
    for _ in range(500):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        for pr in out.prompt_logprobs or []:
            r = out.scheduled[pr.row].request
            assert r.prompt_logprobs is not None
            assert pr.first >= len(r.prompt_logprobs)  # never what is already recorded
            assert pr.end <= r.num_prompt_tokens
        preempted_mid_prompt += sum(
            1 for r in out.preempted if r.prompt_logprobs and len(r.prompt_logprobs) > 1
        )
        pending.append(out)
        while len(pending) > (1 if pipelined else 0):
            done = pending.pop(0)
            sched.update(done, [5] * len(done.sampling), None, _fake_values(done))
    for done in pending:
        sched.update(done, [5] * len(done.sampling), None, _fake_values(done))
    assert not sched.has_unfinished_requests()
    assert sched.num_preemptions > 0 and preempted_mid_prompt > 0
    assert plain.prompt_logprobs is None
    for r in reqs:
        got = r.prompt_logprobs
        assert got is not None and len(got) == r.num_prompt_tokens and got[0] is None
        for pos in range(1, r.num_prompt_tokens):
            e = got[pos]
            assert e is not None and e.token_id == r.prompt_token_ids[pos]
            assert e.logprob == -pos - int(r.request_id) / 10
            assert e.top == ((pos, float(e.logprob)),)
    with pytest.raises(ValueError, match="prompt log-probabilities"):
        r = Request("x", [1, 2, 3], SamplingParams(max_tokens=1, prompt_logprobs=0))
        sched.add_request(r)
        sched.update(sched.schedule(), [5])  # rows that computed some, and none given
