"""Property-based test: random workloads (arrivals over time, aborts, tight memory and budgets,
either scheduling policy with random priorities).

Every step must respect the budget, the slot cap and the K/V contract (and, with the "priority"
policy, keep `waiting` and `running` sorted by (priority, arrival)); in the end every request
has finished for the right reason with exactly the tokens an unconstrained run produces, and
no slot or page is left in use.
"""

from __future__ import annotations

from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine.helpers import FakeKVCache, FakeModel, next_token
from vattention.engine.request import FinishReason, Request, RequestStatus
from vattention.engine.sampling_params import SamplingParams
from vattention.engine.scheduler import Scheduler
from vattention.engine.scheduling import SchedulerConfig, SchedulerOutput

PAGE = 4


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def check_step(sched: Scheduler, cache: FakeKVCache, out: object) -> None:
    from vattention.engine.scheduling import SchedulerOutput

    assert isinstance(out, SchedulerOutput)
    cfg = sched.config
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    assert cache.used_slots == len(sched.running) and cache.free_pages >= 0
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    slots = [r.slot for r in sched.running]
    assert None not in slots and len(slots) == len(set(slots))
    assert all(r.slot is None and r.num_computed_tokens == 0 for r in sched.waiting)
    assert not {r.request_id for r in sched.waiting} & {r.request_id for r in sched.running}
    for s in out.scheduled:
        r = s.request
        assert r.status is RequestStatus.RUNNING and s.slot == r.slot
        assert s.context_len == r.num_computed_tokens and s.num_new_tokens >= 1
        assert s.sample == (r.num_inflight > 0 and s.context_len == r.num_tokens - 1)
        assert cache.lengths[s.slot] >= s.context_len
    if cfg.policy == "priority":
        for queue in (list(sched.waiting), sched.running):
            keys = [r.order_key for r in queue]
            assert keys == sorted(keys)


workloads = st.lists(
    st.tuples(
        st.integers(0, 6),  # arrival step
        st.integers(1, 40),  # prompt length
        st.integers(1, 12),  # max_tokens
        st.integers(-60, 30),  # abort this many steps after arrival (negative: never)
        st.integers(0, 3),  # priority (with the "priority" policy)
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    work=workloads,
    max_num_seqs=st.integers(1, 4),
    extra_budget=st.integers(0, 24),
    slots=st.integers(1, 5),
    pages=st.integers(2, 30),
    batched=st.booleans(),
    pipelined=st.booleans(),
    by_priority=st.booleans(),
)
def test_random_workloads_lose_nothing(
    work: list[tuple[int, int, int, int, int]],
    max_num_seqs: int,
    extra_budget: int,
    slots: int,
    pages: int,
    batched: bool,
    pipelined: bool,
    by_priority: bool,
) -> None:
    """With `pipelined`, step t+1 is scheduled (and "run") before step t's update, as the
    engine's async scheduling does."""
    cache = FakeKVCache(slots, pages, PAGE, batched=batched)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_seqs + extra_budget,
        max_model_len=64,
        policy="priority" if by_priority else "fcfs",
    )
    sched, model = Scheduler(config, cache), FakeModel()
    reqs: list[Request] = []
    aborts: dict[int, list[str]] = {}
    for i, (arrive, prompt_len, max_tokens, abort_after, rank) in enumerate(work):
        prompt = [(7 * i + j) % 50 for j in range(prompt_len)]
        params = SamplingParams(max_tokens=max_tokens)
        reqs.append(Request(f"r{i}", prompt, params, priority=rank if by_priority else 0))
        if abort_after >= 0:
            aborts.setdefault(arrive + abort_after, []).append(f"r{i}")
    finished: list[Request] = []
    aborted: set[str] = set()
    launched: deque[tuple[SchedulerOutput, list[int]]] = deque()
    for t in range(2000):
        for i, (arrive, *_rest) in enumerate(work):
            if arrive == t:
                sched.add_request(reqs[i])
        done = not sched.has_unfinished_requests() and not launched
        if t > max(a for a, *_ in work) and done:
            break
        out = sched.schedule()
        check_step(sched, cache, out)
        for rid in aborts.get(t, []):  # abort while the step "runs"
            if sched.abort_request(rid):
                aborted.add(rid)
        launched.append((out, model.run(out)))
        while len(launched) > (1 if pipelined and not out.is_empty else 0):
            finished += sched.update(*launched.popleft())
    else:
        raise AssertionError("the workload did not finish")

    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in reqs)
    assert cache.used_slots == 0 and cache.used_pages == 0 and not sched.requests
    for r, (_, prompt_len, max_tokens, _, _) in zip(reqs, work, strict=True):
        assert r.is_finished and r.slot is None
        want = expected_output(list(r.prompt_token_ids), max_tokens)
        assert r.output_token_ids == want[: r.num_output_tokens]
        if r.request_id in aborted:
            assert r.finish_reason is FinishReason.ABORT
        elif -(-(prompt_len + max_tokens - 1) // PAGE) > pages:
            assert r.finish_reason is FinishReason.KV_MEMORY
        else:
            assert r.finish_reason is FinishReason.LENGTH and r.output_token_ids == want
