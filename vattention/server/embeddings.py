"""`POST /v1/embeddings` (OpenAI's API): one embedding per input, computed by the engine as
`LLM.embed` computes it (`engine.pooling`: the last input token's final hidden state, cut to
`dimensions` when asked, L2-normalized).

Invariants (those of the completions routes): the request is validated completely (fields,
model name, every input's ids and length) before anything reaches the engine; every input runs
as one engine request, all aborted together if the client goes away or one fails; the answer
lists the embeddings in input order, with `usage` counting the input tokens.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from vattention.engine.pooling import PoolingParams
from vattention.engine.sampling_params import truncate_prompt
from vattention.server.app import _read_body, _Server, _until_disconnect
from vattention.server.async_engine import EngineDeadError, EngineShutdownError, RequestStream
from vattention.server.errors import APIError, bad_request
from vattention.server.protocol import EmbeddingRequest, parse_json, validate


def register_embedding_routes(app: FastAPI, server: _Server, auth: Sequence[Any]) -> None:
    """Add `/v1/embeddings` to `app`; `auth` is the API-key dependency list of `/v1`."""

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(request: Request) -> Response:
        body = parse_json(await _read_body(request, server.max_body_bytes))
        req: EmbeddingRequest = validate(EmbeddingRequest, body)
        server.check_model(req.model)
        hidden = server.engine.engine.model_config.hidden_size
        if req.dimensions is not None and req.dimensions > hidden:
            raise bad_request(
                f"dimensions {req.dimensions} exceeds the model's hidden size {hidden}",
                "dimensions",
            )
        limit, k = server.engine.max_model_len, req.truncate_prompt_tokens
        if k == 0:
            raise bad_request("truncate_prompt_tokens must be -1 or >= 1", "truncate_prompt_tokens")
        inputs = [truncate_prompt(server.prompt_ids(p), k, limit) for p in req.input]
        for ids in inputs:
            server.check_length(len(ids), None, "input", "input")
        params = PoolingParams(dimensions=req.dimensions)
        rid = f"embd-{uuid.uuid4().hex}"
        streams: list[RequestStream] = []
        try:
            for i, ids in enumerate(inputs):
                streams.append(await server.engine.add_request(ids, params, f"{rid}-{i}"))
        except BaseException as e:
            _abort(streams)
            if isinstance(e, (ValueError, TypeError)):
                raise bad_request(str(e), "input") from None
            if isinstance(e, (EngineShutdownError, EngineDeadError)):
                raise APIError(str(e), HTTPStatus.SERVICE_UNAVAILABLE) from None
            raise
        trackers = [server.metrics.tracker() for _ in streams]
        work = asyncio.gather(
            *(server._final(s, t) for s, t in zip(streams, trackers, strict=True)),
            return_exceptions=True,
        )
        try:
            finals = await _until_disconnect(request, work)
        finally:
            server._ended(streams, trackers)
        if finals is None:  # the client went away
            return Response(status_code=499)
        data = []
        for i, f in enumerate(finals):
            if isinstance(f, BaseException):
                raise f
            if f.embedding is None:  # it could not run (too big for the KV budget)
                raise APIError(
                    f"input {i} could not be embedded ({f.outputs[0].finish_reason})",
                    HTTPStatus.SERVICE_UNAVAILABLE,
                )
            vector: Any = f.embedding
            if req.encoding_format == "base64":  # little-endian float32, as OpenAI sends
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": vector, "index": i})
        tokens = sum(len(ids) for ids in inputs)
        return JSONResponse({
            "object": "list", "data": data, "model": server.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })  # fmt: skip


def _abort(streams: list[RequestStream]) -> None:
    for s in streams:
        s.abort()
