"""The "priority" scheduling policy (vLLM's): requests run by priority (lower first), then
arrival; the lowest-ranked running request yields its slot to a waiting one that outranks it;
outputs do not change (greedy), only the order in which requests get to run."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_helpers import prompts, save_tiny

from vattention import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _llm(path: Path, **kw: object) -> LLM:
    opts: dict[str, object] = dict(device="cpu", dtype="float32", max_model_len=128,
                                   max_num_seqs=1, kv_page_size=65536)  # fmt: skip
    opts.update(kw)
    return LLM(str(path), **opts)  # type: ignore[arg-type]


def test_fcfs_refuses_priorities(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m")
    with _llm(tmp_path / "m") as llm, pytest.raises(ValueError, match="scheduling policy is fcfs"):
        llm.generate([[5, 6]], GREEDY, priority=[1], use_tqdm=False)
    with pytest.raises(ValueError, match="'fcfs' or 'priority'"):
        _llm(tmp_path / "m", scheduling_policy="lifo")


def test_requests_run_by_priority_then_arrival(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m")
    batch = prompts(5, seed=1, low=5, high=20)
    ranks = [2, 0, 1, 0, 2]
    with _llm(tmp_path / "m") as fcfs:
        want = [o.token_ids for o in fcfs.generate(batch, GREEDY, use_tqdm=False)]
    with _llm(tmp_path / "m", scheduling_policy="priority") as llm:
        with pytest.raises(ValueError, match="3 priorities for 5 prompts"):
            llm.generate(batch, GREEDY, priority=[0, 1, 2], use_tqdm=False)
        outs = llm.generate(batch, GREEDY, priority=ranks, use_tqdm=False)
    assert [o.token_ids for o in outs] == want  # the same tokens, another order
    first = [o.metrics.first_token_time for o in outs]
    order = sorted(range(5), key=lambda i: first[i])
    assert order == [1, 3, 2, 0, 4]  # priority 0 (by arrival), then 1, then 2


def test_a_waiting_request_that_outranks_takes_the_slot(tmp_path: Path) -> None:
    """One slot: a long low-priority request is running; a high-priority one arrives and runs
    first (the other is preempted and resumes after), both with their own greedy tokens."""
    save_tiny("llama", tmp_path / "m")
    low_p, high_p = [5, 6, 7, 8], [9, 10, 11]
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with _llm(tmp_path / "m") as fcfs:
        want_low = fcfs.generate([low_p], long, use_tqdm=False)[0].token_ids
        want_high = fcfs.generate([high_p], GREEDY, use_tqdm=False)[0].token_ids
    with _llm(tmp_path / "m", scheduling_policy="priority") as llm:
        engine = llm.engine
        low = engine.add_request(low_p, long, priority=5)
        for _ in range(4):  # the low one runs a few steps alone
            engine.step()
        high = engine.add_request(high_p, GREEDY, priority=0)
        done: dict[str, object] = {}
        order: list[str] = []
        while engine.has_unfinished_requests():
            for o in engine.step():
                done[o.request_id] = o
                order.append(o.request_id)
        assert engine.scheduler.num_preemptions >= 1
    assert order == [high, low]
    assert done[high].token_ids == want_high and done[low].token_ids == want_low  # type: ignore[attr-defined]
