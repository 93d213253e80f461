"""`Request`: one generation request's tokens, progress and lifecycle, as the scheduler sees it.

Lifecycle: WAITING -> RUNNING (holds a KV slot) -> FINISHED, with RUNNING -> PREEMPTED ->
RUNNING when the KV cache runs out of memory (recompute: the slot is freed and the prompt plus
the tokens generated so far are prefilled again).

Invariants:
- `all_token_ids == prompt_token_ids + output_token_ids + [PLACEHOLDER] * num_inflight`;
  `num_tokens` is its length. `all_token_ids` is the live list (a plain attribute, read in the
  scheduler's hot loops): read it, do not change it. A placeholder stands for a token that a
  launched step will sample (so the next step can be scheduled before it is known, see
  `Scheduler`); `resolve_output` replaces the oldest one, in order;
- `0 <= num_computed_tokens <= num_tokens`: the first `num_computed_tokens` tokens have their K/V
  in the cache at `slot`, or will have once the launched steps ran (vLLM v1's meaning); it is 0
  whenever the request holds no slot;
- `slot is not None` exactly while RUNNING;
- a finished request has a `finish_reason` and never changes again; preemption keeps the output
  tokens, the text and the seeded generator, so a resumed request continues where it stopped;
- `params` and `eos_token_ids` are fixed at construction (`token_limit` and `length_stops_only`
  are derived from them once);
- `prompt_logprobs` is None unless `params.prompt_logprobs` is set; then it holds the records of
  prompt positions `[0, len)` (position 0 is None: nothing predicts it), collected in position
  order as prefill chunks run and kept across preemption (a recomputed position is not added
  again), so it never holds more than `num_prompt_tokens` entries;
- there is a detokenizer exactly when a tokenizer was given and `params.detokenize`: without
  one the output text stays "";
- `guided` (structured outputs, `engine.structured`) is None unless the engine gave the request
  a grammar matcher (`params.guided_decoding`); the matcher has then accepted exactly
  `output_token_ids`, in order (`resolve_output` feeds it each token).
"""

from __future__ import annotations

import enum
import operator
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from vattention.engine.detokenizer import IncrementalDetokenizer
from vattention.engine.logprobs import TokenLogprobs
from vattention.engine.penalties import PenaltyState
from vattention.engine.pooling import PoolingParams
from vattention.engine.sampling_params import SamplingParams
from vattention.engine.structured import GuidedState

PLACEHOLDER = -1  # the id of a token not sampled yet (never fed to a model: see ModelRunner)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request ended; values are what the API reports."""

    STOP = "stop"  # end-of-sequence, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's length limit
    ABORT = "abort"  # cancelled by the caller
    KV_MEMORY = "kv memory"  # the request alone does not fit in the KV cache


class Request:
    """A request's prompt, params, generated tokens and scheduling state."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        eos_token_ids: int | Sequence[int] | None = None,
        tokenizer: Any = None,
        arrival_time: float | None = None,
        pooling: PoolingParams | None = None,
        priority: int = 0,
    ) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        try:
            prompt = [operator.index(t) for t in prompt_token_ids]
        except TypeError:
            raise TypeError(f"request {request_id}: prompt token ids must be ints") from None
        if not prompt:
            raise ValueError(f"request {request_id}: the prompt has no tokens")
        if min(prompt) < 0:
            raise ValueError(f"request {request_id}: negative prompt token id {min(prompt)}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.stop and tokenizer is None:
            raise ValueError(f"request {request_id}: stop strings need a tokenizer")
        self.request_id = request_id
        self.prompt_token_ids: tuple[int, ...] = tuple(prompt)
        self.params = params
        self.eos_token_ids = _id_set(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None  # time.monotonic() when the host got it
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = prompt  # the live list: read it, do not change it
        self.num_computed_tokens = 0
        self.num_inflight = 0  # tokens launched steps will sample (placeholders at the end)
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None  # the stop token or string that matched
        self.slot: int | None = None
        self.num_preemptions = 0
        self.output_logprobs: list[TokenLogprobs] | None = (
            [] if params.logprobs is not None else None
        )
        # Prompt log-probabilities by position (position 0 has none), see the invariants.
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, prompt, params.skip_special_tokens)
            if tokenizer is not None and params.detokenize
            else None
        )
        # Derived once for the scheduler's per-token work: the most tokens (prompt plus output)
        # max_tokens allows, and whether only the length limits can end the request (no EOS
        # check, no stop tokens, no stop strings), so its stop check is two comparisons.
        self.token_limit = (
            sys.maxsize if params.max_tokens is None else len(prompt) + params.max_tokens
        )
        self.length_stops_only = not (
            (self.eos_token_ids and not params.ignore_eos)
            or params.stop_token_ids
            or params.stop
            or params.guided_decoding is not None
        )
        # The grammar matcher of a structured-output request (set by the engine), else None.
        self.guided: GuidedState | None = None
        # An embedding request (`engine.pooling`): how to pool, and the result once computed.
        self.pooling = pooling
        self.embedding: list[float] | None = None
        # Prompt tokens served from the prefix cache at its first admission (None: not yet).
        self.num_cached_tokens: int | None = None
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {priority!r}")
        self.priority = priority  # lower runs first under the "priority" scheduling policy
        self.order_key = (priority, 0)  # (priority, arrival number): set by the scheduler
        self._generator: torch.Generator | None = None
        self._allowed_mask: torch.Tensor | None = None  # see `allowed_mask`
        # `params.bad_words` as token sequences (set by the engine, which has the tokenizer)
        self.bad_word_ids: tuple[tuple[int, ...], ...] = ()
        self._penalties: PenaltyState | None = None  # made at its first sampling
        # Prefix caching (`engine.prefix_cache`): keys of its page-sized token blocks (a hash
        # chain, built as needed) and how many of its slot's leading pages are published.
        self.block_keys: list[int] = []
        self.num_published_pages = 0

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens},"
            f" output={self.num_output_tokens}, computed={self.num_computed_tokens}, slot={self.slot})"
        )

    # -- tokens -----------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_computed_tokens

    @property
    def num_expected_outputs(self) -> int:
        """Output tokens once the launched steps are done (known ones plus placeholders)."""
        return len(self.output_token_ids) + self.num_inflight

    def add_placeholder(self) -> None:
        """A launched step will sample this request's next token."""
        self.all_token_ids.append(PLACEHOLDER)
        self.num_inflight += 1

    def resolve_output(self, token_id: int, logprobs: TokenLogprobs | None = None) -> str:
        """Put a sampled token in its placeholder (the oldest one); return the text it added
        ("" without a detokenizer)."""
        inflight = self.num_inflight
        if inflight < 1:
            raise RuntimeError(f"request {self.request_id}: no placeholder for a sampled token")
        ids = self.all_token_ids
        ids[len(ids) - inflight] = token_id
        self.num_inflight = inflight - 1
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)
        guided = self.guided
        if guided is not None:
            guided.accept(token_id)
        if logprobs is not None and self.output_logprobs is not None:
            self.output_logprobs.append(logprobs)
        detokenizer = self.detokenizer
        return "" if detokenizer is None else detokenizer.push(token_id)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt log-probabilities are asked for and some are still to be computed
        (such a request takes no prefix-cache hit: cached tokens have no logits)."""
        got = self.prompt_logprobs
        return got is not None and len(got) < len(self.prompt_token_ids)

    def add_prompt_logprobs(self, first: int, entries: Sequence[TokenLogprobs]) -> None:
        """Record the prompt positions `[first, first + len(entries))`; positions already
        recorded (computed again after a preemption) are kept as they are."""
        got = self.prompt_logprobs
        if got is None:
            raise RuntimeError(f"request {self.request_id}: no prompt log-probabilities asked")
        if first < 1 or first > len(got) or first + len(entries) > len(self.prompt_token_ids):
            raise RuntimeError(
                f"request {self.request_id}: prompt log-probabilities of positions "
                f"[{first}, {first + len(entries)}) after {len(got)} recorded, "
                f"prompt of {len(self.prompt_token_ids)}"
            )
        got.extend(entries[len(got) - first :])

    # -- text -------------------------------------------------------------------------------
    @property
    def output_text(self) -> str:
        """Text of the output so far (stop strings trimmed); "" without a tokenizer or with
        `detokenize=False`."""
        return "" if self.detokenizer is None else self.detokenizer.text

    def stream_text(self) -> str:
        """Text safe to show while running: holds back what could still become a stop string."""
        text = self.output_text
        if self.is_finished or not self.params.stop:
            return text
        hold = max(len(s) for s in self.params.stop) - 1
        return text[: max(0, len(text) - hold)]  # (a negative end would cut from the end)

    def trim_text(self, length: int) -> None:
        """Cut the output text to its first `length` characters (a stop string matched there)."""
        if self.detokenizer is not None:
            self.detokenizer.text = self.detokenizer.text[:length]

    # -- state ------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """This request's own generator (created on first use, seeded) or None if unseeded."""
        if self.params.seed is None:
            return None
        device = torch.device(device)
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.params.seed)
        elif self._generator.device.type != device.type:
            raise ValueError(
                f"request {self.request_id}: its generator lives on {self._generator.device}, "
                f"asked for {device}"
            )
        return self._generator

    def bad_tokens_now(self) -> list[int]:
        """The tokens that would complete a bad word after the output's last tokens (all of
        them known: the engine applies launched steps first while such a request runs)."""
        out = self.output_token_ids
        banned = []
        for seq in self.bad_word_ids:
            k = len(seq) - 1
            if k == 0 or (len(out) >= k and tuple(out[len(out) - k :]) == seq[:-1]):
                banned.append(seq[-1])
        return banned

    def allowed_mask(self, vocab: int, device: torch.device | str) -> torch.Tensor:
        """`[vocab]` float32 on `device`: 0 on `params.allowed_token_ids`, -inf elsewhere (made
        once; the params are frozen)."""
        mask = self._allowed_mask
        if mask is None or mask.device.type != torch.device(device).type or mask.numel() != vocab:
            mask = torch.full((vocab,), float("-inf"), dtype=torch.float32)
            mask[list(self.params.allowed_token_ids or ())] = 0.0
            mask = mask.to(device)
            self._allowed_mask = mask
        return mask

    def penalty_state(self, vocab: int, device: torch.device | str) -> PenaltyState:
        """This request's token counts for penalties (made on first use from its prompt and
        the outputs the host knows then; from then on kept up to date on the device)."""
        if self._penalties is None:
            self._penalties = PenaltyState(
                self.prompt_token_ids, self.output_token_ids, vocab, device
            )
        return self._penalties


def _id_set(ids: int | Sequence[int] | None) -> frozenset[int]:
    if ids is None:
        return frozenset()
    if isinstance(ids, int):
        ids = [ids]
    out = frozenset(ids)
    for t in out:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"eos token ids must be non-negative ints, got {t!r}")
    return out
