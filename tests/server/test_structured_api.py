"""Structured outputs through the OpenAI-compatible server: OpenAI's `response_format` and
vLLM's `guided_*` extra fields on both endpoints, streamed and not, and the 400s of bad or
conflicting constraints. The tiny random model writes garbage unless constrained.

JSON requests carry a logit bias against whitespace (see `tests/engine/test_structured_outputs`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from tests.engine.json_helpers import SCHEMA, check_schema
from tests.server.conftest import MODEL, Running, idle

pytest.importorskip("xgrammar")

NO_WS = {"12": -100, "13": -100, "16": -100, "35": -100}  # \t \n \r space (bytes + 3)
CLOSE = {**NO_WS, "37": 10, "128": 10}  # '"' and '}'
MESSAGES: list[Any] = [{"role": "user", "content": "Describe a person as JSON."}]


def test_chat_json_schema(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=150, temperature=0, logit_bias=NO_WS,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        },
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    content = r.choices[0].message.content
    assert content is not None
    check_schema(json.loads(content), SCHEMA)


def test_chat_json_object_streamed(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model=MODEL, messages=MESSAGES, max_tokens=100, temperature=0, logit_bias=CLOSE,
        response_format={"type": "json_object"},
    )  # fmt: skip
    whole = client.chat.completions.create(**kw)
    text = whole.choices[0].message.content or ""
    assert isinstance(json.loads(text), dict)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_guided_choice_both_endpoints(client: openai.OpenAI) -> None:
    choices = ["positive", "negative", "neutral"]
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, temperature=1.0, seed=3, n=4,
        extra_body={"guided_choice": choices},
    )  # fmt: skip
    assert len(r.choices) == 4
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in r.choices)
    c = client.completions.create(
        model=MODEL, prompt=["Hi", "The sentiment is"], max_tokens=20, temperature=0,
        extra_body={"guided_choice": choices},
    )  # fmt: skip
    assert len(c.choices) == 2 and all(x.text in choices for x in c.choices)
    streamed = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=20, temperature=0, stream=True,
        extra_body={"guided_choice": choices},
    )  # fmt: skip
    assert "".join(x.choices[0].text for x in streamed) == c.choices[0].text


def test_completion_guided_regex_json_grammar(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="Call", max_tokens=30, temperature=0,
        extra_body={"guided_regex": r"\+1-[0-9]{3}-[0-9]{4}"},
    )  # fmt: skip
    assert re.fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", r.choices[0].text)
    r = client.completions.create(
        model=MODEL, prompt="JSON:", max_tokens=150, temperature=0, logit_bias=NO_WS,  # type: ignore[arg-type]
        extra_body={"guided_json": json.dumps(SCHEMA)},
    )  # fmt: skip
    check_schema(json.loads(r.choices[0].text), SCHEMA)
    r = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=10, temperature=0,
        extra_body={"guided_grammar": 'root ::= "A" | "B" | "C"'},
    )  # fmt: skip
    assert r.choices[0].text in ("A", "B", "C")
    r = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=8, temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert r.choices[0].text.startswith("{")
    r = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"choice": ["up", "down"], "backend": "xgrammar"}},
    )  # fmt: skip
    assert r.choices[0].text in ("up", "down")


def test_text_response_format_is_unconstrained(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**kw)
    text = client.chat.completions.create(response_format={"type": "text"}, **kw)
    assert text.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    "fields, param, words",
    [
        (
            {"guided_choice": ["a"], "guided_regex": "a"},
            "guided_choice",
            "only one structured-output constraint",
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}},
            "guided_json",
            "only one",
        ),
        ({"guided_json": {"type": "nonsense"}}, "guided_json", "Invalid guided_json"),
        ({"guided_json": "{nope"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "a(b"}, "guided_regex", "Invalid guided_regex"),
        ({"guided_grammar": "root ::= "}, "guided_grammar", "Invalid guided_grammar"),
        ({"guided_choice": []}, "guided_choice", "at least one"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"structured_outputs": {"backend": "x"}}, "structured_outputs", "exactly one"),
        (
            {"structured_outputs": {"regex": "a", "choice": ["a"]}},
            "structured_outputs",
            "exactly one",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            "schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format",
            "JSON schema",
        ),
    ],
)
def test_bad_constraints_are_400s(
    served: Running, fields: dict[str, Any], param: str, words: str
) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for path, body in (
            ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}),
            ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4}),
        ):
            r = http.post(path, json={**body, **fields})
            assert r.status_code == 400, (path, r.text)
            err = r.json()["error"]
            assert err["param"] == param and words in err["message"], err
        ok = http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "guided_choice": ["x", "y"]},
        )
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("x", "y")
    assert idle(served.engine)


def test_grammars_compile_off_the_engine_thread(
    client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new constraint is compiled on a worker thread before the request is queued (a new
    JSON schema takes a fraction of a second, which on the engine thread would stall every
    running request); the engine thread then finds it compiled."""
    import threading

    from vattention.engine.structured import GrammarBackend

    threads: list[str] = []
    real = GrammarBackend.compile

    def recording(self: GrammarBackend, spec: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(self, spec)

    monkeypatch.setattr(GrammarBackend, "compile", recording)
    pattern = "[0-9]{4}-compile-thread"  # a regex no other test uses: a new grammar
    r = client.completions.create(
        model=MODEL, prompt="When?", max_tokens=30, temperature=0,
        extra_body={"guided_regex": pattern},
    )  # fmt: skip
    assert re.fullmatch(pattern, r.choices[0].text)
    assert threads and threads[0] != "vattention-engine"
