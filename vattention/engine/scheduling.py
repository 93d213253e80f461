"""What the scheduler is configured with, what it needs from a KV cache, and what it hands out.

Invariants of a `SchedulerOutput` (built by `Scheduler.schedule`):
- each request appears at most once; decode rows (one new token) come first, then prefill
  chunks, then newly admitted requests, in admission order within each group;
- `sum(num_new_tokens) == num_batched_tokens <= max_num_batched_tokens`;
- for every row, tokens `[0, context_len)` of its slot are backed by the cache
  (`ensure(slot, context_len)` succeeded) and `context_len - num_new_tokens` of them already hold
  K/V; the row's new tokens are `request.all_token_ids[context_len - num_new_tokens:context_len]`;
- a row samples (`sample`) exactly when `context_len == request.num_tokens` at scheduling (the
  request then gets a placeholder for the token, see `Request`); the sampler's rows
  are `output.sampling` in order;
- `prompt_logprobs` is None when no row computes prompt log-probabilities (the common case);
  otherwise it lists, in row order, the rows of requests that asked for them whose new tokens
  predict prompt positions not yet recorded: positions `[first, end)`, with
  `row.start < first < end <= min(row.context_len + 1, num_prompt_tokens)` (position p is
  predicted by the row's token at p - 1).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from vattention.engine.request import Request


@runtime_checkable
class KVCacheManager(Protocol):
    """The part of a KV cache the scheduler uses (`VirtualKVCache` and `PagedKVCache` have it).

    `alloc_slot` raises `OutOfKVMemory` when no slot is free; with `prefix` (cached page keys)
    the slot comes with those pages as its first tokens (`length(slot)` of them: all, or fewer
    where the cache cannot map them all now); `tokens` is how many the request holds now (a
    hint for choosing among free slots). `ensure(slot, n)` backs tokens `[0, n)` of the
    slot all-or-nothing and raises `OutOfKVMemory` when it cannot.
    """

    def alloc_slot(self, prefix: Sequence[Hashable] = (), tokens: int | None = None) -> int: ...

    def free_slot(self, slot: int) -> None: ...

    def ensure(self, slot: int, num_tokens: int) -> None: ...

    def length(self, slot: int) -> int: ...


@dataclass(frozen=True)
class SchedulerConfig:
    """max_num_seqs: most running requests (slots in use); max_num_batched_tokens: token budget
    of one step (decode tokens plus prefill chunks); max_model_len: most tokens (prompt plus
    output) one request may reach; enable_prefix_caching: admit requests over the cached pages
    of their prompt's prefix, and publish full pages (needs a cache that shares pages)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    enable_prefix_caching: bool = False  # share cached prompt pages (`engine.prefix_cache`)
    # "fcfs": first come, first served; "priority": by `Request.priority` (lower first), then
    # arrival, in admission and in preemption (vLLM's scheduling policies)
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {self.policy!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs"
                f" ({self.max_num_seqs}), so every running request can decode in every step"
            )
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2 (a prompt token and an output token)")


class ScheduledRequest(NamedTuple):
    """One row of a step: `num_new_tokens` tokens of `request`, ending at `context_len`.

    Immutable; a named tuple rather than a frozen dataclass because one is built per row and
    step (about 2.5x cheaper to create)."""

    request: Request
    slot: int
    num_new_tokens: int
    context_len: int  # tokens with K/V in the cache once this step ran
    sample: bool  # whether this row reaches the end of the known tokens (a token is sampled)

    @property
    def start(self) -> int:
        """Tokens already holding K/V before this step (the position of the first new token)."""
        return self.context_len - self.num_new_tokens

    def token_ids(self) -> list[int]:
        """The token ids this row feeds to the model."""
        return self.request.all_token_ids[self.start : self.context_len]


class PromptLogprobRow(NamedTuple):
    """A row whose tokens at positions `[first - 1, end - 1)` give the log-probabilities of
    prompt positions `[first, end)` of its request (`row` indexes `scheduled`)."""

    row: int
    first: int
    end: int

    @property
    def num_positions(self) -> int:
        return self.end - self.first


def prompt_logprob_rows(rows: list[ScheduledRequest]) -> list[PromptLogprobRow] | None:
    """The rows that compute prompt log-probabilities (see the module's invariants), or None.

    Positions already recorded on the request (before a preemption) are not computed again;
    positions of launched steps not yet applied are past `row.start`, so never requested
    twice in order."""
    found: list[PromptLogprobRow] = []
    for i, row in enumerate(rows):
        got = row.request.prompt_logprobs
        if got is None:
            continue
        first = max(row.start + 1, len(got))
        end = min(row.context_len + 1, row.request.num_prompt_tokens)
        if first < end:
            found.append(PromptLogprobRow(i, first, end))
    return found or None


@dataclass
class SchedulerOutput:
    """One step's batch, plus what changed while it was built."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)  # lost their slot in this step
    finished: list[Request] = field(default_factory=list)  # ended while scheduling (kv memory)
    # Lengths (tokens to back) each scheduled slot will need in the next step if it keeps
    # running: a hint for `cache.step_async`. Requests sure to end this step are left out; a
    # slot whose request stops on a token may still be freed by `update`.
    next_lengths: dict[int, int] = field(default_factory=dict)
    # Rows that compute prompt log-probabilities; None when none does (see the invariants).
    prompt_logprobs: list[PromptLogprobRow] | None = None
    # Indices into `sampling` of the rows whose hidden state an embedding request pools
    # (`engine.pooling`); None when none does.
    pooling: list[int] | None = None
    # (scheduled list, its length, its sampling rows): `sampling` is read several times a step.
    _sampling: tuple[list[ScheduledRequest], int, list[ScheduledRequest]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def sampling(self) -> list[ScheduledRequest]:
        """The rows that sample a token, in batch order (the sampler's rows); a new list."""
        rows = self.scheduled
        cached = self._sampling
        if cached is None or cached[0] is not rows or cached[1] != len(rows):
            cached = (rows, len(rows), [s for s in rows if s.sample])
            self._sampling = cached
        return list(cached[2])

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def next_lengths(rows: list[ScheduledRequest], max_model_len: int) -> dict[int, int]:
    """Slot -> tokens to back for the next step, if each row's request keeps running: one more
    token after sampling, or the next chunk (as large as this one) of an unfinished prefill.
    Called once the rows' requests hold their placeholders; rows whose sampled token surely
    ends them (max_tokens, max_model_len) are left out."""
    lengths: dict[int, int] = {}
    for s in rows:
        r = s.request
        end = s.context_len
        n = len(r.all_token_ids)
        if not s.sample:
            lengths[s.slot] = end + min(n - end, s.num_new_tokens)
        elif not r.num_inflight or (n < max_model_len and n < r.token_limit):
            lengths[s.slot] = end + 1  # not ends_in_flight(r, max_model_len)
    return lengths


def ends_in_flight(r: Request, max_model_len: int) -> bool:
    """Whether r's tokens in flight (its placeholders) surely end it: max_tokens or the model's
    length limit reached, whatever they turn out to be."""
    if not r.num_inflight:
        return False
    # num_expected_outputs >= max_tokens <=> num_tokens >= num_prompt_tokens + max_tokens
    n = len(r.all_token_ids)
    return n >= max_model_len or n >= r.token_limit
