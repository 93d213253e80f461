"""Scheduler on a page-counting fake cache: chunked prefill, decode-first budget, FCFS admission,
slot limits, preemption by recompute, requests too big for the cache, and stop conditions."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import FakeKVCache, FakeModel, drive
from vattention.engine.request import FinishReason, Request, RequestStatus
from vattention.engine.sampling_params import SamplingParams as SP
from vattention.engine.scheduler import Scheduler
from vattention.engine.scheduling import SchedulerConfig, SchedulerOutput


def make(
    slots: int = 8, pages: int = 1000, page_size: int = 4, batched: bool = False, **config: int
) -> tuple[Scheduler, FakeKVCache]:
    config.setdefault("max_num_seqs", min(slots, config.get("max_num_batched_tokens", 64)))
    config.setdefault("max_model_len", 256)
    cache = FakeKVCache(slots, pages, page_size, batched)
    return Scheduler(SchedulerConfig(**config), cache), cache


def req(rid: str, prompt_len: int, max_tokens: int | None = 4, **params: object) -> Request:
    return Request(rid, list(range(100, 100 + prompt_len)), SP(max_tokens=max_tokens, **params))


def rows(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [
        (s.request.request_id, s.num_new_tokens, s.context_len, s.sample) for s in out.scheduled
    ]


def step(sched: Scheduler, tokens: list[int] | None = None) -> tuple[SchedulerOutput, list]:
    out = sched.schedule()
    tokens = [7] * len(out.sampling) if tokens is None else tokens
    return out, sched.update(out, tokens)


def test_chunked_prefill_splits_a_long_prompt_under_the_budget() -> None:
    sched, cache = make(max_num_batched_tokens=8)
    r = req("a", 20, max_tokens=3)
    sched.add_request(r)
    seen = []
    while sched.has_unfinished_requests():
        out, _ = step(sched)
        seen += rows(out)
    assert seen == [
        ("a", 8, 8, False),
        ("a", 8, 16, False),
        ("a", 4, 20, True),
        ("a", 1, 21, True),
        ("a", 1, 22, True),
    ]
    assert cache.ensure_calls == [(0, 8), (0, 16), (0, 20), (0, 21), (0, 22)]
    assert r.output_token_ids == [7, 7, 7] and r.finish_reason is FinishReason.LENGTH
    assert r.slot is None and cache.used_slots == 0 and cache.used_pages == 0


def test_decodes_come_first_then_prefill_chunks_then_admissions() -> None:
    sched, _ = make(max_num_batched_tokens=4, max_num_seqs=4)
    for rid, n in (("a", 1), ("b", 1), ("c", 9)):
        sched.add_request(req(rid, n, max_tokens=10))
    assert rows(step(sched)[0]) == [("a", 1, 1, True), ("b", 1, 1, True), ("c", 2, 2, False)]
    sched.add_request(req("d", 3))
    # a and b decode first; c gets the rest of the budget; d waits for budget.
    assert rows(step(sched)[0]) == [("a", 1, 2, True), ("b", 1, 2, True), ("c", 2, 4, False)]
    sched.abort_request("a")
    out, finished = step(sched)
    assert [r.request_id for r in finished] == ["a"]
    assert rows(out) == [("b", 1, 3, True), ("c", 3, 7, False)]
    assert rows(step(sched)[0]) == [("b", 1, 4, True), ("c", 2, 9, True), ("d", 1, 1, False)]
    assert rows(step(sched)[0]) == [("b", 1, 5, True), ("c", 1, 10, True), ("d", 2, 3, True)]


def test_fcfs_admission_and_max_num_seqs() -> None:
    sched, cache = make(max_num_batched_tokens=64, max_num_seqs=2)
    for i, n in enumerate((2, 6, 3, 3)):
        sched.add_request(req(f"r{i}", 3, max_tokens=n))
    first_step: dict[str, int] = {}
    for t in range(20):
        if not sched.has_unfinished_requests():
            break
        out, _ = step(sched)
        assert len(out.scheduled) <= 2 and cache.used_slots <= 2
        for rid, *_ in rows(out):
            first_step.setdefault(rid, t)
    assert first_step == {"r0": 0, "r1": 0, "r2": 2, "r3": 5}


def test_cache_slot_exhaustion_only_delays_admission() -> None:
    sched, cache = make(slots=2, max_num_batched_tokens=64, max_num_seqs=8)
    for i in range(5):
        sched.add_request(req(f"r{i}", 5, max_tokens=3))
    out, model = sched.schedule(), FakeModel()
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1"]
    sched.update(out, model.run(out))
    done = drive(sched, model)
    assert sorted(r.request_id for r in done) == ["r0", "r1", "r2", "r3", "r4"]
    assert all(r.num_output_tokens == 3 for r in done) and cache.used_slots == 0


def run_all(pages: int, prompts: list[int], max_tokens: int, **config: int) -> list[Request]:
    sched, cache = make(pages=pages, batched=True, **config)
    reqs = [req(f"r{i}", n, max_tokens=max_tokens, ignore_eos=True) for i, n in enumerate(prompts)]
    for r in reqs:
        sched.add_request(r)
    drive(sched, FakeModel())
    assert cache.used_slots == 0 and cache.used_pages == 0
    assert not sched.requests and not sched.running and not sched.waiting
    return reqs


@pytest.mark.parametrize("batched", [False, True], ids=["ensure", "step"])
def test_preemption_recomputes_and_every_request_finishes_with_the_same_tokens(
    batched: bool,
) -> None:
    prompts = [8, 5, 11, 7, 9]
    roomy = run_all(1000, prompts, 9, max_num_batched_tokens=16)
    sched, cache = make(pages=8, max_num_batched_tokens=16, batched=batched)
    tight = [req(f"r{i}", n, max_tokens=9, ignore_eos=True) for i, n in enumerate(prompts)]
    for r in tight:
        sched.add_request(r)
    model = FakeModel()
    preempted: set[str] = set()
    while sched.has_unfinished_requests():
        out = sched.schedule()
        preempted |= {r.request_id for r in out.preempted}
        assert all(r.status is RequestStatus.PREEMPTED and r.slot is None for r in out.preempted)
        assert out.num_batched_tokens <= 16 and cache.used_pages <= 8
        assert cache.used_slots == len(sched.running)
        if out.preempted:
            assert all(s.request not in sched.waiting for s in out.scheduled)
        sched.update(out, model.run(out))
    assert preempted and sched.num_preemptions >= len(preempted)
    for a, b in zip(roomy, tight, strict=True):
        assert b.finish_reason is FinishReason.LENGTH and b.num_output_tokens == 9
        assert b.output_token_ids == a.output_token_ids
    assert sum(r.num_preemptions for r in tight) == sched.num_preemptions
    assert cache.used_slots == 0 and cache.used_pages == 0
    assert (cache.step_calls > 0) == batched


def test_batched_step_backs_all_running_rows_in_one_call() -> None:
    sched, cache = make(batched=True, max_num_batched_tokens=64)
    for i in range(4):
        sched.add_request(req(f"r{i}", 5, max_tokens=3))
    step(sched)  # admissions use ensure
    calls = len(cache.ensure_calls)
    out, _ = step(sched)
    assert cache.step_calls == 1 and len(cache.ensure_calls) == calls
    assert [s.context_len for s in out.scheduled] == [6] * 4
    assert cache.lengths[:4] == [6] * 4


def test_a_request_too_big_for_the_whole_cache_ends_with_kv_memory() -> None:
    # 4 pages of 4 tokens: "big" cannot even be admitted, "grows" fails mid-decode.
    sched, cache = make(pages=4, max_num_batched_tokens=32)
    big, grows, ok = req("big", 20), req("grows", 10, max_tokens=12), req("ok", 3, max_tokens=5)
    for r in (big, grows, ok):
        sched.add_request(r)
    out, model = sched.schedule(), FakeModel()
    assert out.finished == [big] and big.finish_reason is FinishReason.KV_MEMORY
    sched.update(out, model.run(out))
    drive(sched, model)
    assert grows.finish_reason is FinishReason.KV_MEMORY and 0 < grows.num_output_tokens < 12
    assert ok.finish_reason is FinishReason.LENGTH and ok.num_output_tokens == 5
    assert cache.used_slots == 0 and cache.used_pages == 0


def test_next_lengths_predict_the_next_step() -> None:
    sched, _ = make(max_num_batched_tokens=8)
    sched.add_request(req("a", 12, max_tokens=2))
    out, _ = step(sched)
    assert out.next_lengths == {0: 12}  # the rest of the prompt
    out, _ = step(sched)
    assert out.next_lengths == {0: 13}  # then one decode token
    out, finished = step(sched)
    assert out.next_lengths == {} and finished  # the second token is the last


def test_eos_stop_tokens_and_lengths() -> None:
    sched, _ = make(max_model_len=8)
    a = Request("a", [1, 2], SP(max_tokens=10), eos_token_ids=[9, 10])
    b = Request("b", [1, 2], SP(max_tokens=10, ignore_eos=True), eos_token_ids=9)
    c = Request("c", [1, 2], SP(max_tokens=10, stop_token_ids=[5]))
    d = Request("d", [1, 2, 3, 4, 5], SP(max_tokens=None))
    e = Request("e", [1], SP(max_tokens=2))
    for r in (a, b, c, d, e):
        sched.add_request(r)
    step(sched, [3, 9, 3, 3, 3])
    _, finished = step(sched, [10, 9, 5, 3, 3])
    assert {r.request_id for r in finished} == {"a", "c", "e"}
    assert a.finish_reason is FinishReason.STOP and a.stop_reason is None
    assert a.output_token_ids == [3, 10]  # the eos token stays in the token ids
    assert c.finish_reason is FinishReason.STOP and c.stop_reason == 5
    assert e.finish_reason is FinishReason.LENGTH and e.num_output_tokens == 2
    _, finished = step(sched, [9, 3])
    assert [r.request_id for r in finished] == ["d"] and d.num_tokens == 8  # max_model_len
    assert d.finish_reason is FinishReason.LENGTH and b.status is RequestStatus.RUNNING


def test_stop_strings_trim_the_text() -> None:
    from tests.engine.helpers import byte_tokenizer

    tok = byte_tokenizer()
    sched, _ = make()
    params = SP(max_tokens=11, stop=["lo w", "zzz"])
    r = Request("s", tok.encode("hi").ids, params, tokenizer=tok)
    sched.add_request(r)
    ids = tok.encode("hello world").ids
    for i, t in enumerate(ids[:4]):
        step(sched, [t])
        assert r.output_text == "hello world"[: i + 1]
    assert r.stream_text() == "h"  # "ell" could still start a stop string
    _, finished = step(sched, [ids[4]])
    assert not finished
    step(sched, [ids[5]])
    _, finished = step(sched, [ids[6]])
    assert finished == [r] and r.finish_reason is FinishReason.STOP and r.stop_reason == "lo w"
    assert r.output_text == "hel" and r.stream_text() == "hel" and r.num_output_tokens == 7
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        Request("x", [1], SP(stop=["a"]))


def test_abort_and_logprobs() -> None:
    import torch

    from vattention.engine.logprobs import Logprobs

    sched, cache = make()
    a, b, c = req("a", 3, logprobs=1), req("b", 3), req("c", 3)
    for r in (a, b, c):
        sched.add_request(r)
    assert sched.abort_request("c") and not sched.abort_request("c")
    out = sched.schedule()
    assert sched.abort_request("b")  # while the step runs
    lp = Logprobs(
        torch.tensor([-0.5, -1.0]),
        torch.tensor([[4, 5], [6, 7]]),
        torch.tensor([[-0.5, -2.0], [-1.0, -3.0]]),
    )
    finished = sched.update(out, torch.tensor([4, 6]), lp)
    assert [r.request_id for r in finished] == ["c", "b"]
    assert b.finish_reason is FinishReason.ABORT and b.num_output_tokens == 0
    assert a.output_logprobs is not None and len(a.output_logprobs) == 1
    entry = a.output_logprobs[0]
    assert (entry.token_id, entry.logprob, entry.top) == (4, -0.5, ((4, -0.5),))
    assert b.output_logprobs is None and cache.used_slots == 1 and sched.num_running == 1


def test_misuse_is_rejected_clearly() -> None:
    sched, _ = make(max_model_len=10)
    sched.add_request(req("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(req("a", 3))
    with pytest.raises(ValueError, match="leaves no room"):
        sched.add_request(req("long", 10))
    with pytest.raises(TypeError, match="Request"):
        sched.add_request("a")  # type: ignore[arg-type]
    out = sched.schedule()
    second = sched.schedule()  # pipelined: "a" decodes its in-flight token
    assert [s.request.request_id for s in second.scheduled] == ["a"]
    with pytest.raises(ValueError, match="in order"):
        sched.update(second, [2])
    with pytest.raises(ValueError, match="1 sampling rows"):
        sched.update(out, [])
    with pytest.raises(ValueError, match="in order"):
        sched.update(SchedulerOutput(), [])
    sched.update(out, [1])
    sched.update(second, [2])
    assert sched.requests["a"].output_token_ids == [1, 2]
    with pytest.raises(ValueError, match="must be >= max_num_seqs"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="max_model_len must be >= 2"):
        SchedulerConfig(max_model_len=1)
    with pytest.raises(TypeError, match="max_num_seqs must be an int"):
        SchedulerConfig(max_num_seqs=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="alloc_slot"):
        Scheduler(SchedulerConfig(), object())  # type: ignore[arg-type]
    cache = FakeKVCache(2, 10)
    cache.spec = type("Spec", (), {"max_seq_len": 100})()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="exceeds the cache's max_seq_len 100"):
        Scheduler(SchedulerConfig(max_model_len=200), cache)
    with pytest.raises(ValueError, match="no tokens"):
        Request("e", [])
    with pytest.raises(ValueError, match="negative prompt token id -2"):
        Request("e", [1, -2])
    with pytest.raises(TypeError, match="must be ints"):
        Request("e", [1.5])
    assert Request("e", torch.tensor([3, 4]).tolist()).prompt_token_ids == (3, 4)
