"""vLLM's utility routes: `POST /tokenize`, `POST /detokenize`, `GET /version`.

Invariants:
- they only read the tokenizer and the engine's fixed facts (vocabulary size, context length):
  nothing is queued in the engine, so they hold no KV memory and answer while it is busy;
- `/tokenize` of chat messages (with `add_special_tokens` false, its default) gives exactly the
  ids `/v1/chat/completions` would run, because both go through `_Server.chat_prompt_ids`;
- requests are checked as the completions routes check theirs (the API key, except on
  `/version`, which is open as `/health` is; the body limit,
  strict fields, an unknown `model` is their 404), and every failure is an OpenAI-style error;
- `/tokenize` does not check the context length: it reports `max_model_len` beside `count`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import vattention
from vattention.server.app import _read_body, _Server
from vattention.server.errors import bad_request
from vattention.server.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    parse_json,
    tokenize_request,
    validate,
)


def register_utility_routes(app: FastAPI, server: _Server, auth: Sequence[Any]) -> None:
    """Add the routes to `app`; `auth` is the API-key dependency list of the `/v1` routes."""

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> Response:
        req = tokenize_request(parse_json(await _read_body(request, server.max_body_bytes)))
        if req.model is not None:
            server.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            tokenizer = _tokenizer(server, "messages")
            ids = _chat_ids(server, tokenizer, req)
        else:
            tokenizer = _tokenizer(server, "prompt")
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        ids = [int(t) for t in ids]
        out: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": server.engine.max_model_len,
            "tokens": ids,
        }
        if req.return_token_strs:
            out["token_strs"] = _token_strs(tokenizer, ids)
        return JSONResponse(out)

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> Response:
        body = parse_json(await _read_body(request, server.max_body_bytes))
        req: DetokenizeRequest = validate(DetokenizeRequest, body)
        if req.model is not None:
            server.check_model(req.model)
        tokenizer = _tokenizer(server, "tokens")
        vocab = server.engine.vocab_size
        for i, t in enumerate(req.tokens):
            if t >= vocab:
                raise bad_request(
                    f"token id {t} (tokens[{i}]) is outside the vocabulary (size {vocab})",
                    "tokens",
                )
        return JSONResponse(
            {"prompt": str(tokenizer.decode(req.tokens, skip_special_tokens=False))}
        )

    @app.get("/version")  # open, as /health (vLLM's too): it tells nothing about requests
    async def version() -> Response:
        return JSONResponse({"version": vattention.__version__})


def _tokenizer(server: _Server, param: str) -> Any:
    tokenizer = server.engine.tokenizer
    if tokenizer is None:
        raise bad_request(
            "this model has no tokenizer, so the server cannot convert between text and token ids",
            param,
            code="tokenizer_missing",
        )
    return tokenizer


def _chat_ids(server: _Server, tokenizer: Any, req: TokenizeChatRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model's tokenizer has no chat template, so messages cannot be tokenized; "
            "send a prompt instead",
            "messages",
            code="chat_template_missing",
        )
    chat = req.as_chat()
    if not req.add_special_tokens:
        return server.chat_prompt_ids(chat)
    # vLLM's meaning: the rendered text, encoded with the tokenizer's special tokens added
    kwargs = chat.template_kwargs()
    try:
        text = tokenizer.apply_chat_template(chat.message_dicts(), tokenize=False, **kwargs)
    except Exception as e:  # as chat_prompt_ids: jinja's TemplateError, ...
        raise bad_request(f"the chat template failed on these messages: {e}", "messages") from None
    return list(tokenizer.encode(text, add_special_tokens=True))


def _token_strs(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id's token string (HF's `convert_ids_to_tokens`, else its one-token decode)."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is not None:
        return [str(s) for s in convert(ids)]
    return [str(tokenizer.decode([i], skip_special_tokens=False)) for i in ids]
