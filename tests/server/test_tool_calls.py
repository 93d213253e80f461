"""Tool calling through the OpenAI-compatible server (`vattention/server/tools.py`): a named
function and `"required"` forced with guided JSON, `"none"` and an omitted `tool_choice` as
plain text, streamed calls reassembled from deltas, messages with earlier calls and tool
results, and the 400s. The tiny random model writes garbage unless constrained; JSON requests
carry a logit bias against whitespace (see `tests/engine/test_structured_outputs`)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.engine.json_helpers import SCHEMA, check_schema
from tests.server.conftest import MODEL, Running, idle
from vattention.server import tools
from vattention.server.errors import APIError

pytest.importorskip("xgrammar")

NO_WS = {"12": -100, "13": -100, "16": -100, "35": -100}  # \t \n \r space (bytes + 3)
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 5}, "days": {"enum": [1, 2, 3]}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "weather", "description": "Forecast", "parameters": CITY},
    },
    {"type": "function", "function": {"name": "person", "parameters": SCHEMA}},
]
SCHEMAS = {"weather": CITY, "person": SCHEMA}
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
KW: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, logit_bias=NO_WS)


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def test_named_function(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        **KW, tool_choice=named("weather"), max_tokens=100, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "weather"  # type: ignore[union-attr]
    check_schema(json.loads(call.function.arguments), CITY)  # type: ignore[union-attr]


def test_named_function_n_choices_and_cut_short(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        **KW, tool_choice=named("person"), max_tokens=150, temperature=1.0, seed=1, n=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    ids = set()
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        call = c.message.tool_calls[0]
        ids.add(call.id)
        check_schema(json.loads(call.function.arguments), SCHEMA)  # type: ignore[union-attr]
    assert len(ids) == 2
    short = client.chat.completions.create(
        **KW, tool_choice=named("person"), max_tokens=3, temperature=0
    )
    c = short.choices[0]
    assert c.finish_reason == "length" and c.message.tool_calls
    args = c.message.tool_calls[0].function.arguments  # type: ignore[union-attr]
    assert args.startswith("{") and short.usage is not None
    assert short.usage.completion_tokens == 3


def test_required_with_two_tools(client: openai.OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(
            **KW, tool_choice="required", max_tokens=200, temperature=1.0, seed=seed
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c.message
        assert c.message.content is None and c.message.tool_calls
        for call in c.message.tool_calls:
            name = call.function.name  # type: ignore[union-attr]
            assert name in SCHEMAS
            check_schema(json.loads(call.function.arguments), SCHEMAS[name])  # type: ignore[union-attr]
        assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)


def test_none_and_omitted_are_plain_text(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**kw)
    for extra in ({"tool_choice": "none"}, {}):
        r = client.chat.completions.create(**kw, tools=TOOLS, **extra)
        c = r.choices[0]
        assert c.message.tool_calls is None and c.finish_reason == "length"
        # the stand-in template ignores tools: the same prompt, so the same greedy text
        assert c.message.content == plain.choices[0].message.content


def _reassemble(chunks: list[Any]) -> tuple[dict[int, dict[str, Any]], str | None]:
    calls: dict[int, dict[str, Any]] = {}
    reasons = []
    for chunk in chunks:
        for choice in chunk.choices:
            assert not choice.delta.content
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert call["id"] is None  # id, type and name come once, first
                    call.update(id=d.id, name=d.function.name, type=d.type)
                call["arguments"] += d.function.arguments or ""
    assert all(r is None for r in reasons[:-1])
    return calls, reasons[-1]


def test_streamed_named_call_equals_the_whole_one(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(**KW, tool_choice=named("person"), max_tokens=150, temperature=0)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.tool_calls
    expected = whole.choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    calls, reason = _reassemble(chunks)
    assert reason == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "person" and calls[0]["type"] == "function"
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["arguments"] == expected.function.arguments  # type: ignore[union-attr]
    # the arguments arrive in several deltas, not only at the end
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(pieces) > 3


def test_streamed_required_n_two(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(**KW, tool_choice="required", max_tokens=200, temperature=0)
    whole = client.chat.completions.create(**kw)
    expected = whole.choices[0].message.tool_calls
    assert expected
    chunks = list(client.chat.completions.create(stream=True, n=2, **kw))
    for index in (0, 1):
        mine = [c for c in chunks if c.choices and c.choices[0].index == index]
        calls, reason = _reassemble(mine)
        assert reason == "tool_calls"
        got = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
        assert got == [(e.function.name, e.function.arguments) for e in expected]  # type: ignore[union-attr]


def test_history_with_tool_calls_and_results(served: Running, client: openai.OpenAI) -> None:
    messages: list[Any] = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=4, temperature=0
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert r.usage is not None and r.usage.completion_tokens == 4
    # the template saw the tool result (the stand-in template renders each message's content;
    # the byte-level tokenizer makes one token a byte)
    with httpx.Client(base_url=served.url, timeout=30) as http:
        rendered = http.post("/tokenize", json={"model": MODEL, "messages": messages})
        assert rendered.status_code == 200, rendered.text
        base = http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
    assert r.usage.prompt_tokens == rendered.json()["count"]
    added = "<|assistant|>\n\n<|tool|>\nSunny, 21 C\n"
    assert r.usage.prompt_tokens == base["count"] + len(added)


def test_tools_reach_the_chat_template(served: Running, client: openai.OpenAI) -> None:
    # the byte-level fallback tokenizer renders messages itself: record what it is given
    tokenizer = served.engine.tokenizer
    real = tokenizer.apply_chat_template
    seen: list[dict[str, Any]] = []

    def recording(messages: Any, **kwargs: Any) -> Any:
        seen.append({"messages": messages, **kwargs})
        return real(messages, **kwargs)

    tokenizer.apply_chat_template = recording
    try:
        kw: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0)
        client.chat.completions.create(**kw)
        client.chat.completions.create(**kw, tools=TOOLS, tool_choice="none")
        client.chat.completions.create(
            model=MODEL, max_tokens=1, temperature=0, tools=TOOLS[:1],
            messages=[
                *MESSAGES,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Rome"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "Rain"},
            ],
        )  # fmt: skip
    finally:
        del tokenizer.apply_chat_template
    assert len(seen) == 3
    assert "tools" not in seen[0]
    assert seen[1]["tools"] == TOOLS
    assert seen[2]["tools"] == TOOLS[:1]
    assistant, tool = seen[2]["messages"][1:]
    assert assistant["role"] == "assistant" and assistant["tool_calls"] == [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": {"city": "Rome"}}},
    ]  # fmt: skip
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": "Rain"}


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "auto"),
        ({"tools": TOOLS, "tool_choice": named("nope")}, "tool_choice", "'nope'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "must be"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1", "unique"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name", ""),
        ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools.0.type", ""),
        ({"tools": [{"type": "function"}]}, "tools.0.function", "required"),
        (
            {
                "tools": TOOLS,
                "tool_choice": named("weather"),
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
            "response_format",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"},
            "tool_choice",
            "cannot be combined",
        ),
        (
            {
                "tools": [
                    TOOLS[0],
                    {"type": "function", "function": {"name": "b", "parameters": {"type": "x"}}},
                ],
                "tool_choice": "required",
            },
            "tools.1.function.parameters",
            "JSON schema",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "b", "parameters": []}}],
                "tool_choice": named("b"),
            },
            "tools.0.function.parameters",
            "",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}, *MESSAGES]},
            None,
            None,
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [
                            {
                                "id": "a",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    }
                ]
            },
            "messages.0",
            "only assistant",
        ),
    ],
)
def test_bad_tool_requests_are_400s(
    served: Running, fields: dict[str, Any], param: str | None, words: str | None
) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}
    with httpx.Client(base_url=served.url, timeout=30) as http:
        r = http.post("/v1/chat/completions", json=body)
        if param is None:  # an empty tool_calls list is no call: accepted
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and words in err["message"], err
    assert idle(served.engine)


def test_auto_without_tools_is_plain_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, tool_choice="auto"
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_required_schema_hoists_defs() -> None:
    color = {"enum": ["red", "blue"]}
    paint = {
        "type": "object",
        "properties": {"color": {"$ref": "#/$defs/color"}},
        "required": ["color"],
        "$defs": {"color": color},
    }
    plan = tools.plan([("paint", paint), ("noop", None)], "required")
    assert plan is not None and plan.name is None
    schema = plan.guided.schema()
    assert schema["$defs"] == {"color": color} and schema["minItems"] == 1
    variants = schema["items"]["anyOf"]
    assert [v["properties"]["name"]["enum"] for v in variants] == [["paint"], ["noop"]]
    assert "$defs" not in variants[0]["properties"]["parameters"]
    assert variants[1]["properties"]["parameters"] == tools.ANY_OBJECT
    calls = plan.calls(
        '[{"name": "paint", "parameters": {"color": "red"}}, {"name": "noop", "parameters": {}}]'
    )
    assert calls is not None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("paint", {"color": "red"}),
        ("noop", {}),
    ]
    assert plan.calls('[{"name": "paint", "para') is None  # cut short: no calls
    other = {**paint, "$defs": {"color": {"enum": ["green"]}}}
    with pytest.raises(APIError, match=r"\$defs 'color'"):
        tools.plan([("paint", paint), ("other", other)], "required")
