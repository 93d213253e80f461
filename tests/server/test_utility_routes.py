"""vLLM's utility routes against a real uvicorn server (API key required, a chat template set):
`/tokenize` of a prompt or of chat messages equals the tokenizer's ids and the chat route's
prompt, `/detokenize` round-trips and refuses ids outside the vocabulary, `/version`; unknown
models, missing keys, tokenizers or templates get the completions routes' errors."""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import vattention
from tests.server.conftest import (
    CHAT_TEMPLATE,
    MAX_MODEL_LEN,
    MODEL,
    VOCAB,
    Running,
    engine_config,
    idle,
    serving,
)
from vattention.server.async_engine import AsyncEngine
from vattention.server.protocol import ChatCompletionRequest

KEY = "utility-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXT = "Hello, wörld!"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a page table?"},
]


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[Running]:
    engine = AsyncEngine.from_config(engine_config(model_dir))
    engine.tokenizer.chat_template = CHAT_TEMPLATE
    with serving(engine, api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def http(served: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=30) as client:
        yield client


@pytest.fixture
def tokenizer(served: Running) -> Any:
    return served.engine.tokenizer


def post(http: httpx.Client, path: str, status: int = 200, **body: Any) -> dict[str, Any]:
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    return dict(r.json())


def error(http: httpx.Client, path: str, status: int, **body: Any) -> dict[str, Any]:
    err = post(http, path, status, **body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    return dict(err)


@contextlib.contextmanager
def tokenizer_attr(served: Running, obj: Any, name: str, value: Any) -> Iterator[None]:
    """`obj.name = value` on the engine thread inside the block (restored after)."""
    old = getattr(obj, name)
    served.engine.call_sync(lambda e: setattr(obj, name, value))
    try:
        yield
    finally:
        served.engine.call_sync(lambda e: setattr(obj, name, old))


def test_tokenize_a_prompt_equals_the_tokenizers_encode(http: httpx.Client, tokenizer: Any) -> None:
    want = list(tokenizer.encode(TEXT))
    assert len(want) == len(TEXT.encode()) + 1  # a BOS and one id per UTF-8 byte
    for body in ({"prompt": TEXT}, {"prompt": TEXT, "model": MODEL}):
        assert post(http, "/tokenize", **body) == {
            "count": len(want),
            "max_model_len": MAX_MODEL_LEN,
            "tokens": want,
        }
    assert post(http, "/tokenize", prompt="")["tokens"] == [tokenizer.bos_token_id]


def test_add_special_tokens(http: httpx.Client, tokenizer: Any) -> None:
    plain = post(http, "/tokenize", prompt=TEXT, add_special_tokens=False)["tokens"]
    special = post(http, "/tokenize", prompt=TEXT, add_special_tokens=True)["tokens"]
    assert plain == tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.bos_token_id not in plain
    assert special == [tokenizer.bos_token_id, *plain]
    # the chat form, with them: its rendered text encoded with the special tokens (vLLM's way)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    got = post(http, "/tokenize", messages=MESSAGES, add_special_tokens=True)["tokens"]
    assert got == tokenizer.encode(text, add_special_tokens=True)


def test_tokenize_chat_equals_the_chat_routes_prompt(served: Running, http: httpx.Client) -> None:
    server = served.server.config.app.state.server  # the app's own chat rendering
    for gen in (True, False):
        req = ChatCompletionRequest(model=MODEL, messages=MESSAGES, add_generation_prompt=gen)
        want = server.chat_prompt_ids(req)
        got = post(http, "/tokenize", messages=MESSAGES, add_generation_prompt=gen)
        assert got == {"count": len(want), "max_model_len": MAX_MODEL_LEN, "tokens": want}
    with_prompt = post(http, "/tokenize", messages=MESSAGES)["tokens"]
    without = post(http, "/tokenize", messages=MESSAGES, add_generation_prompt=False)["tokens"]
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    # the chat route runs that many prompt tokens
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
    usage = post(http, "/v1/chat/completions", **chat)["usage"]
    assert usage["prompt_tokens"] == len(with_prompt)


def test_return_token_strs(http: httpx.Client, tokenizer: Any) -> None:
    assert "token_strs" not in post(http, "/tokenize", prompt="abc")
    got = post(http, "/tokenize", prompt="abc", return_token_strs=True)
    assert got["tokens"] == tokenizer.encode("abc")
    assert got["token_strs"] == ["", "a", "b", "c"]  # the BOS is no text for the byte tokenizer
    chat = post(http, "/tokenize", messages=MESSAGES[1:], return_token_strs=True)
    assert len(chat["token_strs"]) == chat["count"]
    assert "".join(chat["token_strs"]) == "<|user|>\nWhat is a page table?\n<|assistant|>\n"


def test_detokenize_round_trips(http: httpx.Client) -> None:
    for special in (True, False):
        ids = post(http, "/tokenize", prompt=TEXT, add_special_tokens=special)["tokens"]
        assert post(http, "/detokenize", tokens=ids) == {"prompt": TEXT}
    assert post(http, "/detokenize", model=MODEL, tokens=[3 + ord("x")]) == {"prompt": "x"}
    assert post(http, "/detokenize", tokens=[]) == {"prompt": ""}


def test_detokenize_refuses_ids_outside_the_vocabulary(served: Running, http: httpx.Client) -> None:
    err = error(http, "/detokenize", 400, tokens=[5, VOCAB - 1, VOCAB])
    assert err["param"] == "tokens"
    assert (
        f"token id {VOCAB} (tokens[2]) is outside the vocabulary (size {VOCAB})" in (err["message"])
    )
    assert error(http, "/detokenize", 400, tokens=[5, -1])["param"] == "tokens.1"
    assert error(http, "/detokenize", 400, tokens="abc")["param"] == "tokens"
    assert idle(served.engine)


def test_bad_tokenize_bodies(http: httpx.Client) -> None:
    assert error(http, "/tokenize", 400, model=MODEL)["code"] == "missing_required"
    assert "not both" in error(http, "/tokenize", 400, prompt="x", messages=MESSAGES)["message"]
    assert error(http, "/tokenize", 400, prompt=[1, 2])["param"] == "prompt"
    assert error(http, "/tokenize", 400, messages=[])["param"] == "messages"
    assert error(http, "/tokenize", 400, prompt="x", add_special_tokens=1)["param"] == (
        "add_special_tokens"
    )


def test_an_unknown_model_is_the_completions_routes_404(http: httpx.Client) -> None:
    want = error(http, "/v1/completions", 404, model="gpt-4", prompt="x")
    assert want["code"] == "model_not_found" and want["param"] == "model"
    assert error(http, "/tokenize", 404, model="gpt-4", prompt="x") == want
    assert error(http, "/tokenize", 404, model="gpt-4", messages=MESSAGES) == want
    assert error(http, "/detokenize", 404, model="gpt-4", tokens=[5]) == want


def test_no_tokenizer_or_no_chat_template_is_a_400(served: Running, http: httpx.Client) -> None:
    with tokenizer_attr(served, served.engine.tokenizer, "chat_template", None):
        err = error(http, "/tokenize", 400, messages=MESSAGES)
        assert err["code"] == "chat_template_missing" and "chat template" in err["message"]
        assert post(http, "/tokenize", prompt="x")["count"] == 2  # prompts still work
    with tokenizer_attr(served, served.engine.engine, "tokenizer", None):
        for path, body in [
            ("/tokenize", {"prompt": "x"}),
            ("/tokenize", {"messages": MESSAGES}),
            ("/detokenize", {"tokens": [5]}),
        ]:
            err = error(http, path, 400, **body)
            assert err["code"] == "tokenizer_missing" and "no tokenizer" in err["message"]
    assert post(http, "/detokenize", tokens=[3 + ord("y")]) == {"prompt": "y"}


def test_version(http: httpx.Client) -> None:
    r = http.get("/version")
    assert r.status_code == 200
    assert r.json() == {"version": vattention.__version__}
    assert vattention.__version__ == importlib.metadata.version("vattention")


def test_an_api_key_is_required(served: Running) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for method, path, body in [
                ("POST", "/tokenize", {"prompt": "x"}),
                ("POST", "/detokenize", {"tokens": [5]}),
            ]:
                r = anon.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert anon.get("/health").status_code == 200
        assert anon.get("/version").status_code == 200  # open, as /health (and vLLM's)


def test_chat_template_options_render_as_the_chat_route(
    served: Running, http: httpx.Client
) -> None:
    """`continue_final_message` extends the last assistant message, `chat_template_kwargs`
    reach the template; `/tokenize` renders them as `/v1/chat/completions` runs them."""
    tokenizer = served.engine.engine.tokenizer
    old = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}{% if shout %}!{% endif %}"
    )
    try:
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The sky"}]
        opts = {"add_generation_prompt": False, "continue_final_message": True}
        tok = post(http, "/tokenize", model=MODEL, messages=msgs, **opts)
        assert tokenizer.decode(tok["tokens"]).endswith("<|assistant|>\nThe sky")  # goes on
        r = post(http, "/v1/chat/completions", model=MODEL, messages=msgs, max_tokens=2, **opts)
        assert r["usage"]["prompt_tokens"] == tok["count"]
        shout = post(http, "/tokenize", model=MODEL, messages=msgs[:1],
                     chat_template_kwargs={"shout": True})  # fmt: skip
        assert tokenizer.decode(shout["tokens"]).endswith("<|assistant|>\n!")
        bad = post(http, "/v1/chat/completions", 400, model=MODEL, messages=msgs,
                   continue_final_message=True)  # fmt: skip
        assert "add_generation_prompt" in bad["error"]["message"]
        bad = post(http, "/v1/chat/completions", 400, model=MODEL, messages=msgs[:1],
                   chat_template_kwargs={"add_generation_prompt": False})  # fmt: skip
        assert bad["error"]["param"] == "chat_template_kwargs"
    finally:
        tokenizer.chat_template = old
