"""`SamplingParams`: how one request's tokens are chosen and when its generation stops.

Invariants: a `SamplingParams` is frozen and validated at construction, so everything downstream
(sampler, scheduler, stop checks) trusts it: `1 <= n <= MAX_N`; `temperature >= 0` (0 means greedy);
`top_k` is -1 or 0 (off) or a positive count; `0 < top_p <= 1`; `0 <= min_p <= 1`;
`max_tokens` is None (until the model's length limit) or positive; `stop_token_ids` and `stop`
are tuples (lists are accepted and converted); `logprobs` is None (off) or the number of top
alternatives returned with each sampled token's own log-probability (0 = the sampled one only);
`prompt_logprobs` is None (off) or, likewise, the number of top alternatives returned with each
prompt token's own log-probability (every prompt position after the first);
`stop` strings need `detokenize` (they are matched in the output text);
`-2 <= presence_penalty, frequency_penalty <= 2` (0 = off) and `repetition_penalty > 0`
(1 = off); `logit_bias` is None or a read-only mapping of non-negative token ids to biases in
[-100, 100] (the engine checks the ids against its vocabulary); `0 <= min_tokens <=
max_tokens`; `guided_decoding` is None or a validated `GuidedDecodingParams` (a dict of its
fields is converted; see `engine.structured`), whose check needs the optional `xgrammar`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vattention.engine.structured import GuidedDecodingParams

# Temperatures below this are treated as greedy (dividing by them would overflow float32).
GREEDY_TEMPERATURE = 1e-5
MAX_N = 128  # most completions per prompt


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping options (a subset of vLLM's, same meanings).

    n: completions per prompt (`LLM.generate` and the server run n requests over the same
        prompt, which the prefix cache shares; a seeded request's choice i uses seed + i).
    temperature: 0 picks the most likely token (greedy, exact argmax); > 0 samples
        (values below 1e-5 count as 0).
    top_k: keep the k most likely tokens; -1 or 0 keeps all.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
    min_p: drop tokens whose probability is below min_p times the most likely one's.
    presence_penalty: subtracted from the logit of every token already generated (OpenAI's).
    frequency_penalty: subtracted once per time a token was already generated (OpenAI's).
    repetition_penalty: divides positive (multiplies negative) logits of tokens in the prompt
        or the output (vLLM's and HF's); > 1 discourages repeats. Penalties apply to greedy
        requests too (see `engine.penalties`).
    logit_bias: token id -> value added to its logit before sampling (OpenAI's; -100 all but
        bans a token, 100 all but forces it); applies to greedy requests too.
    seed: per-request seed; the request's tokens then do not depend on the rest of the batch.
    max_tokens: most tokens to generate; None stops only at the model's length limit.
    min_tokens: fewest tokens to generate before the end-of-sequence token, a stop token or a
        stop string may end the request (vLLM's): those tokens cannot be sampled before (a
        structured-output request ends when its grammar does, whatever min_tokens says).
    stop_token_ids: tokens that end generation (kept in the output token ids).
    stop: strings that end generation (trimmed from the output text); needs a tokenizer.
    include_stop_str_in_output: keep the stop string that ended the output in its text
        (vLLM's).
    ignore_eos: keep generating past the end-of-sequence token.
    logprobs: None, or return each sampled token's log-probability plus this many top ones.
    prompt_logprobs: None, or return each prompt token's log-probability (given the tokens
        before it) plus this many top ones (vLLM's): `RequestOutput.prompt_logprobs`, None at
        position 0. The request then computes its whole prompt (no prefix-cache hit) with
        logits for every prompt row; with `n > 1` only the first choice computes them
        (`choices()`): they belong to the prompt.
    skip_special_tokens: leave special tokens out of the output text.
    detokenize: produce the output text; False returns token ids only (text ""), which saves
        the per-token detokenization (stop strings then cannot be used).
    truncate_prompt_tokens: None, or keep only the prompt's last k tokens (vLLM's left
        truncation; -1: as many as the model's context leaves room for, max_model_len - 1).
    allowed_token_ids: None, or the only tokens that may be sampled (vLLM's); applies to
        greedy requests too.
    bad_words: words that may not be generated (vLLM's): each is tokenized as is and after a
        space, and a token that would complete one of those sequences after the output's
        last tokens cannot be sampled; needs a tokenizer.
    guided_decoding: structured output (vLLM's name): None, or `GuidedDecodingParams` (or a
        dict of its fields) with exactly one of `json` (a JSON schema), `json_object`,
        `regex`, `choice`, `grammar` (EBNF). The output then follows it token by token
        (`engine.structured`; needs `pip install xgrammar`) and ends with "stop" once it is
        complete. Validated here: a bad schema, regex or grammar is a `ValueError`.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default=())
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    guided_decoding: GuidedDecodingParams | None = None
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _is_int(self.n):
            raise TypeError(f"n must be an int, got {type(self.n).__name__}")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        self._check_real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not _is_int(self.top_k):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive count, got {self.top_k}")
        self._check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self._check_real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            self._check_real(name, getattr(self, name))
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        self._check_real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        object.__setattr__(self, "logit_bias", self._bias(self.logit_bias))
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.max_tokens is not None:
            if not _is_int(self.max_tokens):
                raise TypeError(
                    f"max_tokens must be an int or None, got {type(self.max_tokens).__name__}"
                )
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not _is_int(self.min_tokens):
            raise TypeError(f"min_tokens must be an int, got {type(self.min_tokens).__name__}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        object.__setattr__(self, "stop_token_ids", self._token_ids(self.stop_token_ids))
        object.__setattr__(self, "stop", self._stop_strings(self.stop))
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_int(value):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (or None), got {value}")
        if not isinstance(self.skip_special_tokens, bool):
            raise TypeError("skip_special_tokens must be a bool")
        if not isinstance(self.detokenize, bool):
            raise TypeError(f"detokenize must be a bool, got {type(self.detokenize).__name__}")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise TypeError("include_stop_str_in_output must be a bool")
        words = self.bad_words
        if isinstance(words, str) or not all(isinstance(w, str) and w for w in words):
            raise TypeError(f"bad_words must be a sequence of non-empty strings, got {words!r}")
        object.__setattr__(self, "bad_words", tuple(words))
        if self.allowed_token_ids is not None:
            allowed = self._token_ids(self.allowed_token_ids, "allowed_token_ids")
            if not allowed:
                raise ValueError("allowed_token_ids must name at least one token (or be None)")
            object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(allowed))))
        k = self.truncate_prompt_tokens
        if k is not None:
            if not _is_int(k):
                raise TypeError(f"truncate_prompt_tokens must be an int or None, got {k!r}")
            if k < -1 or k == 0:
                raise ValueError(f"truncate_prompt_tokens must be -1 or >= 1 (or None), got {k}")
        if self.stop and not self.detokenize:
            raise ValueError(
                f"stop strings {list(self.stop)} need detokenize=True: they are matched in the"
                " output text, which detokenize=False does not produce (use stop_token_ids)"
            )
        if self.guided_decoding is not None:
            object.__setattr__(
                self, "guided_decoding", GuidedDecodingParams.from_value(self.guided_decoding)
            )

    @staticmethod
    def _check_real(name: str, value: Any) -> None:
        if not _is_real(value):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")

    @staticmethod
    def _bias(bias: Mapping[int, float] | None) -> Mapping[int, float] | None:
        if not bias:
            return None
        if not isinstance(bias, Mapping):
            raise TypeError(f"logit_bias must map token ids to numbers, got {bias!r}")
        out: dict[int, float] = {}
        for t, v in bias.items():
            if not _is_int(t) or t < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {t!r}")
            SamplingParams._check_real("logit_bias value", v)
            if not -100.0 <= v <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {v}")
            out[t] = float(v)
        return MappingProxyType(out)

    @staticmethod
    def _token_ids(ids: Iterable[int] | None, name: str = "stop_token_ids") -> tuple[int, ...]:
        if ids is None:
            return ()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"{name} must be a sequence of ints, got {ids!r}")
        out = tuple(ids)
        for t in out:
            if not _is_int(t) or t < 0:
                raise ValueError(f"{name} must be non-negative ints, got {t!r}")
        return out

    @staticmethod
    def _stop_strings(stop: str | Iterable[str] | None) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, Iterable):
            raise TypeError(f"stop must be a string or a sequence of strings, got {stop!r}")
        out = tuple(stop)
        for s in out:
            if not isinstance(s, str):
                raise TypeError(f"stop strings must be str, got {type(s).__name__}")
            if not s:
                raise ValueError("stop strings must not be empty")
        return out

    def choices(self) -> list[SamplingParams]:
        """One `n == 1` copy per completion; choice i of a seeded request gets seed + i; only
        choice 0 keeps `prompt_logprobs` (the prompt's, computed once: the other choices may
        then share its pages through the prefix cache)."""
        if self.n == 1:
            return [self]
        return [
            dataclasses.replace(
                self,
                n=1,
                seed=None if self.seed is None else self.seed + i,
                prompt_logprobs=self.prompt_logprobs if i == 0 else None,
            )
            for i in range(self.n)
        ]

    @functools.cached_property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes its rows' logits or draws noise (no seed, no
        penalties, no logit bias, no min_tokens, no guided decoding): the sampler's per-step
        fast path (derived once: the params are frozen)."""
        return (
            self.greedy
            and self.seed is None
            and not self.needs_penalties
            and not self.logit_bias
            and not self.min_tokens
            and self.guided_decoding is None
            and self.allowed_token_ids is None
            and not self.bad_words
        )

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by exact argmax (temperature 0, or below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def needs_top_p(self) -> bool:
        return self.top_p < 1.0

    @property
    def needs_min_p(self) -> bool:
        return self.min_p > 0.0

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def penalty_factors(self) -> tuple[float, float, float]:
        """(repetition, frequency, presence) as floats."""
        return (
            float(self.repetition_penalty),
            float(self.frequency_penalty),
            float(self.presence_penalty),
        )


def truncate_prompt(ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """`ids` left-truncated to `truncate_prompt_tokens` = `k` (see `SamplingParams`)."""
    if k is None:
        return ids
    keep = max_model_len - 1 if k == -1 else k
    return ids[-keep:] if len(ids) > keep else ids
