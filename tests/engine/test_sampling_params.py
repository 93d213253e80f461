"""SamplingParams: defaults, normalisation and clear errors for bad values."""

from __future__ import annotations

import dataclasses

import pytest

from vattention import SamplingParams


def test_defaults_and_flags() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p) == (1, 1.0, -1, 1.0, 0.0)
    assert p.max_tokens == 16 and p.stop == () and p.stop_token_ids == () and p.logprobs is None
    assert not p.greedy and not p.needs_top_k and not p.needs_top_p and not p.needs_min_p
    q = SamplingParams(temperature=0, top_k=5, top_p=0.9, min_p=0.1)
    assert q.greedy and q.needs_top_k and q.needs_top_p and q.needs_min_p
    assert SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams(top_k=0).needs_top_k


def test_lists_become_tuples_and_params_are_frozen() -> None:
    p = SamplingParams(stop_token_ids=[3, 4], stop="###")
    assert p.stop_token_ids == (3, 4) and p.stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert hash(p) == hash(SamplingParams(stop_token_ids=(3, 4), stop=("###",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 0}, ValueError, r"n must be in \[1, 128\]"),
        ({"n": 129}, ValueError, r"n must be in \[1, 128\]"),
        ({"n": 1.0}, TypeError, "n must be an int"),
        ({"temperature": -0.1}, ValueError, "temperature must be >= 0"),
        ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number"),
        ({"top_k": -2}, ValueError, "top_k must be -1 or 0"),
        ({"top_k": 2.5}, TypeError, "top_k must be an int"),
        ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"min_p": -0.1}, ValueError, r"min_p must be in \[0, 1\]"),
        ({"seed": "7"}, TypeError, "seed must be an int"),
        ({"seed": True}, TypeError, "seed must be an int"),
        ({"max_tokens": 0}, ValueError, "max_tokens must be >= 1"),
        ({"max_tokens": True}, TypeError, "max_tokens must be an int"),
        ({"stop_token_ids": [1, -1]}, ValueError, "stop_token_ids must be non-negative"),
        ({"stop_token_ids": 5}, TypeError, "stop_token_ids must be a sequence"),
        ({"stop": [""]}, ValueError, "stop strings must not be empty"),
        ({"stop": [1]}, TypeError, "stop strings must be str"),
        ({"ignore_eos": 1}, TypeError, "ignore_eos must be a bool"),
        ({"logprobs": -1}, ValueError, "logprobs must be >= 0"),
        ({"logprobs": 1.0}, TypeError, "logprobs must be an int"),
        ({"skip_special_tokens": None}, TypeError, "skip_special_tokens must be a bool"),
        ({"presence_penalty": 2.5}, ValueError, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -3}, ValueError, r"frequency_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": "1"}, TypeError, "frequency_penalty must be a number"),
        ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty must be > 0"),
        ({"logit_bias": {-1: 1.0}}, ValueError, "logit_bias keys must be non-negative"),
        ({"logit_bias": {"5": 1.0}}, ValueError, "logit_bias keys must be non-negative"),
        ({"logit_bias": {5: 101}}, ValueError, r"logit_bias values must be in \[-100, 100\]"),
        ({"logit_bias": {5: "1"}}, TypeError, "logit_bias value must be a number"),
        ({"logit_bias": [5]}, TypeError, "logit_bias must map token ids"),
        ({"repetition_penalty": float("inf")}, ValueError, "repetition_penalty must be finite"),
    ],
)
def test_bad_values_name_the_problem(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_edge_values_are_accepted() -> None:
    SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=1.0, max_tokens=None, logprobs=0)
    SamplingParams(top_k=1, top_p=1e-6, seed=0, stop_token_ids=None, stop=None)
    p = SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.5)
    assert p.needs_penalties and p.penalty_factors == (0.5, 2.0, -2.0)
    assert not SamplingParams().needs_penalties
    b = SamplingParams(logit_bias={3: -100, 7: 2.5})
    assert dict(b.logit_bias or {}) == {3: -100.0, 7: 2.5}
    with pytest.raises(TypeError):
        b.logit_bias[3] = 0  # type: ignore[index]  # read-only
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert hash(b) == hash(SamplingParams(logit_bias={3: -100, 7: 2.5}))
