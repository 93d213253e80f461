"""Bad requests: each gets a 4xx with an OpenAI-style error body naming the problem, leaves
nothing in the engine, and a good request is served right after it. The server here requires
an API key and has no chat template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL, VOCAB, Running, engine_config, idle, serving
from vattention.server.async_engine import AsyncEngine

KEY = "sekrit"
MAX_BODY = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[Running]:
    engine = AsyncEngine.from_config(engine_config(model_dir))
    assert engine.tokenizer.chat_template is None
    with serving(engine, api_key=KEY, max_body_bytes=MAX_BODY) as running:
        yield running


@pytest.fixture(scope="module")
def http(served: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        yield client


def cmpl(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}


def drop(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


C, CHAT = "/v1/completions", "/v1/chat/completions"

# (id, method, path, body: dict (JSON) or bytes (raw), headers, status, text the error names)
CASES: list[tuple[str, str, str, Any, dict[str, str] | None, int, str]] = [
    ("malformed-json", "POST", C, b'{"model": "tiny", "prompt": ', None, 400, "not valid JSON"),
    ("empty-body", "POST", C, b"", None, 400, "empty"),
    ("json-not-object", "POST", C, b"[1, 2]", None, 400, "JSON object"),
    ("nan", "POST", C, b'{"model":"tiny","prompt":"x","temperature":NaN}', None, 400, "NaN"),
    ("missing-model", "POST", C, drop(cmpl(), "model"), None, 400, "model"),
    ("wrong-model", "POST", C, cmpl(model="gpt-4"), None, 404, "model"),
    ("model-not-string", "POST", C, cmpl(model=3), None, 400, "model"),
    ("missing-prompt", "POST", C, drop(cmpl(), "prompt"), None, 400, "prompt"),
    ("prompt-int", "POST", C, cmpl(prompt=5), None, 400, "prompt"),
    ("prompt-dict", "POST", C, cmpl(prompt={"text": "x"}), None, 400, "prompt"),
    ("prompt-batch-too-big", "POST", C, cmpl(prompt=["a"] * 257), None, 400, "prompt"),
    ("prompt-batch-bad-item", "POST", C, cmpl(prompt=["a", [1, -2]]), None, 400, "prompt"),
    ("prompt-batch-empty-item", "POST", C, cmpl(prompt=["a", []]), None, 400, "prompt"),
    ("prompt-empty-list", "POST", C, cmpl(prompt=[]), None, 400, "prompt"),
    ("prompt-mixed-list", "POST", C, cmpl(prompt=[1, "a"]), None, 400, "prompt"),
    ("token-id-negative", "POST", C, cmpl(prompt=[1, -3]), None, 400, "prompt"),
    ("token-id-beyond-vocab", "POST", C, cmpl(prompt=[1, VOCAB + 5]), None, 400, "prompt"),
    ("token-id-bool", "POST", C, cmpl(prompt=[True, 2]), None, 400, "prompt"),
    (
        "prompt-longer-than-context",
        "POST",
        C,
        cmpl(prompt=[7] * (MAX_MODEL_LEN + 10)),
        None,
        400,
        "prompt",
    ),  # fmt: skip
    ("max-tokens-negative", "POST", C, cmpl(max_tokens=-1), None, 400, "max_tokens"),
    ("max-tokens-zero", "POST", C, cmpl(max_tokens=0), None, 400, "max_tokens"),
    ("max-tokens-string", "POST", C, cmpl(max_tokens="5"), None, 400, "max_tokens"),
    ("max-tokens-float", "POST", C, cmpl(max_tokens=2.5), None, 400, "max_tokens"),
    (
        "max-tokens-beyond-context",
        "POST",
        C,
        cmpl(max_tokens=MAX_MODEL_LEN),
        None,
        400,
        "max_tokens",
    ),  # fmt: skip
    ("temperature-negative", "POST", C, cmpl(temperature=-0.5), None, 400, "temperature"),
    ("temperature-too-large", "POST", C, cmpl(temperature=2.5), None, 400, "temperature"),
    ("temperature-string", "POST", C, cmpl(temperature="hot"), None, 400, "temperature"),
    ("top-p-zero", "POST", C, cmpl(top_p=0), None, 400, "top_p"),
    ("top-p-above-one", "POST", C, cmpl(top_p=1.5), None, 400, "top_p"),
    ("top-k-below-minus-one", "POST", C, cmpl(top_k=-2), None, 400, "top_k"),
    ("top-k-float", "POST", C, cmpl(top_k=1.5), None, 400, "top_k"),
    ("min-p-above-one", "POST", C, cmpl(min_p=2), None, 400, "min_p"),
    ("seed-string", "POST", C, cmpl(seed="42"), None, 400, "seed"),
    ("n-zero", "POST", C, cmpl(n=0), None, 400, "n"),
    ("n-too-many", "POST", C, cmpl(n=1000), None, 400, "n"),
    ("logprobs-negative", "POST", C, cmpl(logprobs=-1), None, 400, "logprobs"),
    ("logprobs-too-many", "POST", C, cmpl(logprobs=50), None, 400, "logprobs"),
    ("logprobs-bool", "POST", C, cmpl(logprobs=True), None, 400, "logprobs"),
    ("stop-int", "POST", C, cmpl(stop=5), None, 400, "stop"),
    ("stop-list-of-ints", "POST", C, cmpl(stop=[1, 2]), None, 400, "stop"),
    ("stop-empty-string", "POST", C, cmpl(stop=[""]), None, 400, "stop"),
    ("stream-string", "POST", C, cmpl(stream="yes"), None, 400, "stream"),
    (
        "stream-options-without-stream",
        "POST",
        C,
        cmpl(stream_options={"include_usage": True}),
        None,
        400,
        "stream_options",
    ),  # fmt: skip
    ("penalty-out-of-range", "POST", C, cmpl(presence_penalty=3), None, 400, "presence_penalty"),
    ("frequency-below", "POST", C, cmpl(frequency_penalty=-2.5), None, 400, "frequency_penalty"),
    ("repetition-zero", "POST", C, cmpl(repetition_penalty=0), None, 400, "repetition_penalty"),
    ("min-tokens-negative", "POST", C, cmpl(min_tokens=-1), None, 400, "min_tokens"),
    ("min-over-max", "POST", C, cmpl(min_tokens=9, max_tokens=3), None, 400, "min_tokens"),
    ("logit-bias-key", "POST", C, cmpl(logit_bias={"x": 10}), None, 400, "logit_bias"),
    ("logit-bias-range", "POST", C, cmpl(logit_bias={"5": 101}), None, 400, "logit_bias"),
    ("logit-bias-vocab", "POST", C, cmpl(logit_bias={"99999": 1}), None, 400, "logit_bias"),
    (
        "max-tokens-zero-min",
        "POST",
        C,
        cmpl(echo=True, max_tokens=0, min_tokens=1),
        None,
        400,
        "min_tokens",
    ),  # fmt: skip
    ("prompt-logprobs-negative", "POST", C, cmpl(prompt_logprobs=-1), None, 400, "prompt_"),
    ("prompt-logprobs-too-many", "POST", C, cmpl(prompt_logprobs=21), None, 400, "prompt_"),
    ("prompt-logprobs-bool", "POST", C, cmpl(prompt_logprobs=True), None, 400, "prompt_"),
    (
        "prompt-logprobs-stream",
        "POST",
        C,
        cmpl(prompt_logprobs=1, stream=True),
        None,
        400,
        "prompt_logprobs",
    ),  # fmt: skip
    (
        "chat-prompt-logprobs-stream",
        "POST",
        CHAT,
        chat(prompt_logprobs=0, stream=True),
        None,
        400,
        "prompt_logprobs",
    ),  # fmt: skip
    ("ignore-eos-string", "POST", C, cmpl(ignore_eos="no"), None, 400, "ignore_eos"),
    ("oversized-body", "POST", C, cmpl(prompt="x" * (MAX_BODY + 1)), None, 413, "larger"),
    ("wrong-method", "GET", C, None, None, 405, "GET"),
    ("unknown-route", "POST", "/v1/nope", cmpl(), None, 404, "/v1/nope"),
    ("api-key-missing", "POST", C, cmpl(), {"Authorization": ""}, 401, "API key"),
    ("api-key-wrong", "POST", C, cmpl(), {"Authorization": "Bearer nope"}, 401, "API key"),
    ("api-key-not-bearer", "GET", "/v1/models", None, {"Authorization": KEY}, 401, "API key"),
    ("chat-missing-messages", "POST", CHAT, drop(chat(), "messages"), None, 400, "messages"),
    ("chat-empty-messages", "POST", CHAT, chat(messages=[]), None, 400, "messages"),
    (
        "chat-bad-role",
        "POST",
        CHAT,
        chat(messages=[{"role": "wizard", "content": "x"}]),
        None,
        400,
        "messages.0.role",
    ),  # fmt: skip
    (
        "chat-tool-message-without-id",
        "POST",
        CHAT,
        chat(messages=[{"role": "tool", "content": "x"}]),
        None,
        400,
        "tool_call_id",
    ),  # fmt: skip
    (
        "chat-content-int",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": 5}]),
        None,
        400,
        "messages.0.content",
    ),  # fmt: skip
    (
        "chat-image-part",
        "POST",
        CHAT,
        chat(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        None,
        400,
        "messages.0.content",
    ),
    ("chat-message-not-object", "POST", CHAT, chat(messages=["hi"]), None, 400, "messages.0"),
    ("chat-top-logprobs-alone", "POST", CHAT, chat(top_logprobs=2), None, 400, "top_logprobs"),
    (
        "chat-top-logprobs-too-many",
        "POST",
        CHAT,
        chat(logprobs=True, top_logprobs=30),
        None,
        400,
        "top_logprobs",
    ),  # fmt: skip
    ("chat-logprobs-int", "POST", CHAT, chat(logprobs=3), None, 400, "logprobs"),
    (
        "chat-max-completion-tokens-zero",
        "POST",
        CHAT,
        chat(max_completion_tokens=0),
        None,
        400,
        "max_completion_tokens",
    ),  # fmt: skip
    ("chat-tools", "POST", CHAT, chat(tools=[{"type": "function"}]), None, 400, "tools"),
    ("chat-n-three", "POST", CHAT, chat(n=3), None, 400, "n"),
    ("chat-no-template", "POST", CHAT, chat(), None, 400, "chat template"),
]


def _send(http: httpx.Client, method: str, path: str, body: Any, headers: Any) -> httpx.Response:
    h = {**AUTH, **(headers or {})}
    if isinstance(body, bytes):
        return http.request(
            method, path, content=body, headers={**h, "Content-Type": "application/json"}
        )
    if body is None:
        return http.request(method, path, headers=h)
    return http.request(method, path, json=body, headers=h)


def _good(http: httpx.Client) -> None:
    r = http.post(C, json=cmpl(prompt=[3, 4, 5], max_tokens=3, temperature=0), headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "names"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_request_gets_an_openai_error_and_the_server_goes_on(
    served: Running, http: httpx.Client, method: str, path: str, body: Any,
    headers: dict[str, str] | None, status: int, names: str,
) -> None:  # fmt: skip
    r = _send(http, method, path, body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert names in f"{error['param']} {error['message']}", error
    _good(http)


def test_nothing_is_left_behind(served: Running, http: httpx.Client) -> None:
    for case in CASES[:10]:
        _send(http, *case[1:5])
    assert idle(served.engine)


def test_the_openai_client_sees_typed_errors(served: Running) -> None:
    client = openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", n=0)
    assert e.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.base_url, api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_health_and_metrics_need_no_key(served: Running, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    metrics = http.get("/metrics")
    assert (
        metrics.status_code == 200
        and 'vattention_request_errors_total{status="400"}' in metrics.text
    )
    assert json.loads(http.get("/v1/models", headers=AUTH).text)["data"][0]["id"] == MODEL
