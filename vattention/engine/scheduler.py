"""The scheduler: continuous batching with chunked prefill under a token budget (vLLM v1 shape).

There are no prefill and decode phases. Every request has `num_computed_tokens` (tokens whose
K/V is in the cache) and each step lets running requests catch up towards `num_tokens`: first
the decoding ones (one token each), then unfinished prefills in chunks, then waiting requests
are admitted first-come first-served, all within `max_num_batched_tokens` and `max_num_seqs`.

Memory: before a row is scheduled, `cache.ensure(slot, context_len)` backs it (running rows are
first tried together with the cache's batched `step(lengths)`, when it has one). On
`OutOfKVMemory` the most recently admitted running request is preempted (recompute: its slot is
freed, `num_computed_tokens` goes back to 0, its output is kept, and it waits at the head of the
queue to be prefilled again), then the call is retried. A request that cannot fit even when it
is the only one holding memory ends with `FinishReason.KV_MEMORY`. No step admits new requests
after it had to preempt.

Pipelining (async scheduling): `schedule()` may run again before the previous step's `update()`,
so the host schedules and launches step i+1 while the GPU still runs step i. To allow it,
`schedule()` records each row's progress itself (`num_computed_tokens = context_len`) and gives
every sampling row's request a placeholder token; the runner feeds a placeholder from the
previous step's sampled ids on the device; `update()` (called once per `schedule()`, in order)
puts the sampled tokens into the placeholders and applies stop conditions. Requests sure to end
with their in-flight tokens (max_tokens, max_model_len) are not scheduled again; one that ends
on a sampled token (EOS, stop) may already be in the next launched step: that row's token is
dropped. Freeing a slot while a launched step still writes it is safe: the GPU runs steps in
order, and the cache synchronizes the device before it unmaps anything.

Invariants: every request is in exactly one of `waiting` (no slot), `running` (holds a slot) or
finished (no slot, gone from `requests`); `running` is in admission order (with the "priority"
policy both `waiting` and `running` are sorted by `Request.order_key`, (priority, arrival):
admission takes the head of `waiting`, preemption the last of `running`, and with every slot
in use a waiting head that outranks the last running request takes its slot); the first running
request always makes progress, so every request eventually finishes (with "priority", every
request no other keeps outranking); `update()` gets the
outputs of `schedule()` in the order they were made; a request with tokens in flight is not
admitted (after preemption) before they are resolved.

Prompt log-probabilities (`SamplingParams.prompt_logprobs`): while a request that asked for
them has positions left to compute, each step lists the rows that compute some
(`SchedulerOutput.prompt_logprobs`, see `scheduling`) and `update()` records what they
computed on the request, by position (kept across preemption, never added twice). Such a
request takes no prefix-cache hit (`prefix_cache`). Steps without such requests pay one check.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from vattention.engine.logprobs import HostLogprobs, Logprobs
from vattention.engine.pooling import finish_embedding
from vattention.engine.prefix_cache import PrefixCaching
from vattention.engine.request import FinishReason, Request, RequestStatus
from vattention.engine.scheduling import (
    KVCacheManager,
    ScheduledRequest,
    SchedulerConfig,
    SchedulerOutput,
    ends_in_flight,
    next_lengths,
    prompt_logprob_rows,
)
from vattention.engine.stop import check_stop
from vattention.memory.errors import OutOfKVMemory


class Scheduler:
    """Decides each step's batch and keeps every request's progress."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        if not isinstance(config, SchedulerConfig):
            raise TypeError(f"config must be a SchedulerConfig, got {type(config).__name__}")
        if not isinstance(kv_cache, KVCacheManager):
            raise TypeError(
                "kv_cache must have alloc_slot(), free_slot(slot), ensure(slot, n) and length(slot)"
            )
        cache_len = getattr(getattr(kv_cache, "spec", None), "max_seq_len", None)
        if isinstance(cache_len, int) and config.max_model_len > cache_len:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the cache's max_seq_len {cache_len}"
            )
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.max_running = 0  # most requests running at once so far (a capacity statistic)
        self.prefix: PrefixCaching | None = (
            PrefixCaching(kv_cache) if config.enable_prefix_caching else None
        )
        self._finished: list[Request] = []  # ended since the last update()
        self._pending: deque[SchedulerOutput] = deque()  # scheduled, not yet updated
        # Unfinished requests with prompt log-probabilities still to compute (usually none).
        self._prompt_logprobs: set[Request] = set()
        # Unfinished embedding requests (`engine.pooling`; usually none).
        self._pooling: set[Request] = set()
        # The "priority" policy: `waiting` and `running` kept sorted by (priority, arrival), so
        # the head of `waiting` is admitted first and the last running request is preempted.
        self._by_priority = config.policy == "priority"
        self._arrivals = 0

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request (FCFS)."""
        if not isinstance(request, Request):
            raise TypeError(f"expected a Request, got {type(request).__name__}")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.num_output_tokens:
            raise ValueError(f"request {request.request_id} was already scheduled")
        if request.num_prompt_tokens >= self.config.max_model_len:
            raise ValueError(
                f"request {request.request_id}: the prompt has {request.num_prompt_tokens} tokens;"
                f" max_model_len {self.config.max_model_len} leaves no room for output"
            )
        if request.priority and not self._by_priority:
            raise ValueError(
                f"request {request.request_id} has priority {request.priority}, but the "
                "scheduling policy is fcfs (use scheduling_policy='priority')"
            )
        self.requests[request.request_id] = request
        self._arrivals += 1
        request.order_key = (request.priority, self._arrivals)
        if self._by_priority:
            self._insert(self.waiting, request)
        else:
            self.waiting.append(request)
        if request.needs_prompt_logprobs:
            self._prompt_logprobs.add(request)
        if request.pooling is not None:
            self._pooling.add(request)

    def abort_request(self, request_id: str) -> bool:
        """End a request now (`FinishReason.ABORT`); False if it is unknown or already over."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, FinishReason.ABORT)
        return True

    def drop_pending(self) -> None:
        """Forget the scheduled-but-not-updated steps and the finished list (an engine reset:
        their requests were aborted, so nothing is waiting for their tokens)."""
        self._pending.clear()
        self._finished.clear()

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's rows and back them in the cache; see the module docstring."""
        out = SchedulerOutput()
        if self._by_priority and self.waiting and len(self.running) >= self.config.max_num_seqs:
            self._preempt_for_priority(out)
        scheduled: list[ScheduledRequest] = []
        budget = self.config.max_num_batched_tokens

        max_len = self.config.max_model_len
        # Plan the running requests: decodes first (one token each; they fit, since
        # len(running) <= max_num_seqs <= the budget), then prefill chunks as far as the budget
        # goes. One pass over `running` on plain attributes: it runs every step over every
        # running request.
        plan: list[ScheduledRequest] = []
        prefills: list[tuple[Request, int]] = []  # (request, tokens left to compute)
        new = tuple.__new__  # ScheduledRequest(...) without its Python-level __new__ (2x faster)
        for r in self.running:
            if ends_in_flight(r, max_len):
                continue  # its tokens in flight surely end it: not scheduled again
            n = len(r.all_token_ids)
            left = n - r.num_computed_tokens
            if left == 1:
                slot = r.slot if r.slot is not None else _slot(r)  # _slot raises
                plan.append(new(ScheduledRequest, (r, slot, 1, n, True)))
            elif left > 1:
                prefills.append((r, left))
        num_decodes = len(plan)
        budget -= num_decodes
        for r, left in prefills:
            if budget == 0:
                break
            n = min(left, budget)
            end = r.num_computed_tokens + n
            plan.append(ScheduledRequest(r, _slot(r), n, end, n == left))
            budget -= n
        if self._back_all(plan):  # the common case: one batched call backs every row
            scheduled = plan
        elif plan:  # back row by row, preempting as needed
            budget = self.config.max_num_batched_tokens
            step: dict[str, ScheduledRequest] = {}
            decodes = [row.request for row in plan[:num_decodes]]
            for r in decodes + [r for r, _ in prefills]:
                if budget == 0:
                    break
                if r.status is not RequestStatus.RUNNING:
                    continue  # preempted (or ended) earlier in this step
                n = min(r.num_uncomputed_tokens, budget)
                budget += self._back(r, r.num_computed_tokens + n, step, out)
                if r.status is RequestStatus.RUNNING:
                    step[r.request_id] = self._row(r, n)
                    budget -= n
            scheduled = list(step.values())

        yielded = len(out.preempted)  # slots given up to outrank ("priority"): admit anyway
        while len(out.preempted) == yielded and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            r = self.waiting[0]
            if r.num_inflight:
                break  # preempted while a step sampling for it ran: resume once it is known
            n = self._admit(r, budget, out)
            if r.is_finished:
                continue  # too big even alone; try the next one
            if not n:
                break
            scheduled.append(self._row(r, n))
            budget -= n

        out.scheduled = scheduled
        for row in scheduled:
            req = row.request
            req.num_computed_tokens = row.context_len
            if row.sample:
                req.add_placeholder()
        out.next_lengths = next_lengths(scheduled, max_len)
        if self._prompt_logprobs:  # the one check other steps pay
            out.prompt_logprobs = prompt_logprob_rows(scheduled)
        if self._pooling:  # rows that end an embedding request's prompt
            pool = [i for i, row in enumerate(out.sampling) if row.request.pooling is not None]
            out.pooling = pool or None
        self._pending.append(out)
        return out

    def update(
        self,
        output: SchedulerOutput,
        sampled_token_ids: Sequence[int] | torch.Tensor,
        logprobs: Logprobs | HostLogprobs | None = None,
        prompt_logprobs: Logprobs | HostLogprobs | None = None,
        pooled: Sequence[Sequence[float]] | None = None,
    ) -> list[Request]:
        """Record that `output` ran: advance progress, record its prompt log-probabilities
        (`prompt_logprobs`: one row per position of `output.prompt_logprobs`, in order),
        append the sampled tokens (one per `output.sampling` row, in order), apply stop
        conditions and free finished slots.

        Returns every request that ended since the previous update (including aborted ones and
        those that ended while scheduling)."""
        if not self._pending or output is not self._pending[0]:
            raise ValueError("update() must get the outputs of schedule() in order")
        rows = output.sampling
        if isinstance(sampled_token_ids, torch.Tensor):
            ids = sampled_token_ids.tolist()
        else:
            ids = list(map(int, sampled_token_ids))
        if len(ids) != len(rows):
            raise ValueError(f"got {len(ids)} sampled tokens for {len(rows)} sampling rows")
        lp = logprobs.to_host() if isinstance(logprobs, Logprobs) else logprobs
        if lp is not None and len(lp.sampled) != len(rows):
            raise ValueError(f"got log-probabilities for {len(lp.sampled)} rows, not {len(rows)}")
        if (output.prompt_logprobs is None) != (prompt_logprobs is None):
            raise ValueError("prompt log-probabilities must come exactly with the rows asking")
        if (output.pooling is None) != (pooled is None) or (
            pooled is not None and len(pooled) != len(output.pooling or ())
        ):
            raise ValueError("pooled hidden states must come exactly with the rows pooling")
        self._pending.popleft()
        if output.prompt_logprobs is not None and prompt_logprobs is not None:
            self._record_prompt_logprobs(output, prompt_logprobs)
        if output.pooling is not None and pooled is not None:
            for i, vec in zip(output.pooling, pooled, strict=True):
                r = rows[i].request
                if r.pooling is not None and r.embedding is None and not r.is_finished:
                    r.embedding = finish_embedding(vec, r.pooling)
                    self._pooling.discard(r)
        max_len = self.config.max_model_len
        finished_status = RequestStatus.FINISHED
        ended: list[tuple[Request, FinishReason]] = []  # finished after the loop, in order
        for i, (s, token) in enumerate(zip(rows, ids, strict=True)):
            r = s.request
            if r.status is finished_status:
                continue  # aborted, or ended on an earlier token, while the step ran
            entry = None
            if lp is not None and (k := r.params.logprobs) is not None:
                entry = lp.entry(i, token, k)
            text = r.resolve_output(token, entry)
            reason = check_stop(r, token, text, max_len)  # two comparisons if length-only
            if reason is not None:
                ended.append((r, reason))
        if self.prefix is not None:  # before finished requests give their slots back
            running = RequestStatus.RUNNING
            for row in output.scheduled:
                r = row.request
                if r.status is running and r.slot is not None:
                    self.prefix.publish(r, r.slot)
        if ended:
            self._finish_all(ended)
        out, self._finished = self._finished, []
        return out

    # -- internals --------------------------------------------------------------------------
    def _insert(self, queue: deque[Request] | list[Request], r: Request) -> None:
        """Put `r` into the sorted `queue` ("priority" policy)."""
        queue.insert(_index(queue, r.order_key), r)

    def _preempt_for_priority(self, out: SchedulerOutput) -> None:
        """ "priority" policy, every slot in use: while the head of `waiting` outranks the last
        running request, that one yields its slot (before this step's rows are planned)."""
        cap = self.config.max_num_seqs
        while (
            self.waiting and len(self.running) >= cap and self.running
            and self.waiting[0].order_key < self.running[-1].order_key
            and not self.waiting[0].num_inflight
        ):  # fmt: skip
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if self.waiting[0] is victim:
                break  # it outranks nothing now

    def _record_prompt_logprobs(
        self, output: SchedulerOutput, logprobs: Logprobs | HostLogprobs
    ) -> None:
        """Give each listed row's request the prompt positions its row computed."""
        rows = output.prompt_logprobs or []
        lp = logprobs.to_host() if isinstance(logprobs, Logprobs) else logprobs
        total = sum(pr.num_positions for pr in rows)
        if len(lp.sampled) != total:
            raise ValueError(f"got {len(lp.sampled)} prompt log-probabilities for {total}")
        at = 0
        for pr in rows:
            r = output.scheduled[pr.row].request
            got = r.prompt_logprobs
            if got is not None and r.status is not RequestStatus.FINISHED:
                ids, k = r.prompt_token_ids, r.params.prompt_logprobs or 0
                skip = max(0, len(got) - pr.first)  # recorded before a preemption: kept
                r.add_prompt_logprobs(
                    pr.first + skip,
                    [lp.entry(at + j, ids[pr.first + j], k) for j in range(skip, pr.num_positions)],
                )
                if not r.needs_prompt_logprobs:
                    self._prompt_logprobs.discard(r)
            at += pr.num_positions

    def _row(self, r: Request, n: int) -> ScheduledRequest:
        end = r.num_computed_tokens + n
        return ScheduledRequest(r, _slot(r), n, end, sample=end == r.num_tokens)

    def _back_all(self, plan: list[ScheduledRequest]) -> bool:
        """Back every planned row at once with the cache's batched, all-or-nothing `step`
        (when it has one); False if it has none or it ran out of memory (nothing changed)."""
        batched = getattr(self.kv_cache, "step", None)
        if not plan or not callable(batched):
            return False
        try:
            batched({row.slot: row.context_len for row in plan})
        except OutOfKVMemory:
            return False
        return True

    def _back(
        self, r: Request, num_tokens: int, step: dict[str, ScheduledRequest], out: SchedulerOutput
    ) -> int:
        """`ensure` r's first num_tokens, preempting the newest running requests as needed.

        Leaves r RUNNING on success. Returns the tokens given back to the budget by victims that
        had already been scheduled in this step."""
        refund = 0
        while True:
            try:
                self.kv_cache.ensure(_slot(r), num_tokens)
                return refund
            except OutOfKVMemory:
                victim = self.running[-1]
                if victim is r and len(self.running) == 1:
                    self._finish(r, FinishReason.KV_MEMORY)
                    out.finished.append(r)
                    return refund
                dropped = step.pop(victim.request_id, None)
                refund += dropped.num_new_tokens if dropped is not None else 0
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is r:
                    return refund

    def _admit(self, r: Request, budget: int, out: SchedulerOutput) -> int:
        """Give the head of `waiting` a slot, its cached prefix (prefix caching) and backing
        for its next chunk of at most `budget` tokens; returns the chunk's size.

        0 when it cannot be admitted now (no slot or no memory); a request that cannot fit
        even with nothing else running is finished with `FinishReason.KV_MEMORY`."""
        keys = self.prefix.cached_keys(r) if self.prefix is not None else []
        try:  # with cached keys, the slot comes with their pages mapped (zero-copy)
            slot = self.kv_cache.alloc_slot(keys, tokens=r.num_tokens)
        except OutOfKVMemory:
            return 0
        if keys:  # fewer where they end inside a prefix segment that cannot be split now
            keys = keys[: self.kv_cache.length(slot) // self.prefix.per_page]  # type: ignore[union-attr]
        cached = len(keys) * self.prefix.per_page if self.prefix is not None else 0
        n = min(r.num_tokens - cached, budget)
        try:
            self.kv_cache.ensure(slot, cached + n)
        except OutOfKVMemory:
            self.kv_cache.free_slot(slot)
            if not self.running:  # alone and still too big: it never fits
                self._finish(r, FinishReason.KV_MEMORY)
                out.finished.append(r)
            return 0  # otherwise wait for running requests to give memory back
        if self.prefix is not None:
            self.prefix.admitted(r, keys)
        if r.num_cached_tokens is None:
            r.num_cached_tokens = cached
        self.waiting.popleft()
        r.slot, r.status, r.num_computed_tokens = slot, RequestStatus.RUNNING, cached
        if self._by_priority:
            self._insert(self.running, r)
        else:
            self.running.append(r)
        self.max_running = max(self.max_running, len(self.running))
        return n

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self.kv_cache.free_slot(_slot(r))
        r.slot, r.num_computed_tokens, r.num_published_pages = None, 0, 0
        r.status = RequestStatus.PREEMPTED
        r.num_preemptions += 1
        self.num_preemptions += 1
        if self._by_priority:
            self._insert(self.waiting, r)
        else:
            self.waiting.appendleft(r)

    def _finish_all(self, ended: list[tuple[Request, FinishReason]]) -> None:
        """`_finish` each (request, reason) in order, filtering `running` once, not per row."""
        for r, reason in ended:
            if r.status is not RequestStatus.RUNNING:
                self._finish(r, reason)  # preempted since its step was scheduled: waiting
                continue
            self.kv_cache.free_slot(_slot(r))
            r.slot, r.num_computed_tokens, r.num_published_pages = None, 0, 0
            r.status, r.finish_reason = RequestStatus.FINISHED, reason
            self.requests.pop(r.request_id, None)
            self._finished.append(r)
            if self._prompt_logprobs:
                self._prompt_logprobs.discard(r)
            if self._pooling:
                self._pooling.discard(r)
        self.running[:] = [r for r in self.running if r.status is not RequestStatus.FINISHED]

    def _finish(self, r: Request, reason: FinishReason) -> None:
        if r.status is RequestStatus.FINISHED:
            return
        if r.status is RequestStatus.RUNNING:
            self.running.remove(r)
            self.kv_cache.free_slot(_slot(r))
        else:
            self.waiting.remove(r)
        r.slot, r.num_computed_tokens, r.num_published_pages = None, 0, 0
        r.status, r.finish_reason = RequestStatus.FINISHED, reason
        self.requests.pop(r.request_id, None)
        self._finished.append(r)
        self._prompt_logprobs.discard(r)
        self._pooling.discard(r)


def _index(queue: deque[Request] | list[Request], key: tuple[int, int]) -> int:
    """Where a request of sort `key` goes in `queue` (sorted by `order_key`): after its equals."""
    lo, hi = 0, len(queue)
    while lo < hi:
        mid = (lo + hi) // 2
        if queue[mid].order_key <= key:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _slot(r: Request) -> int:
    if r.slot is None:
        raise RuntimeError(f"request {r.request_id} is running without a slot")
    return r.slot
