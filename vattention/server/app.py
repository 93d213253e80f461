"""`create_app`: the OpenAI-compatible HTTP API over an `AsyncEngine` (FastAPI).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with SSE streaming),
`POST /v1/embeddings` (`embeddings.py`), `GET /v1/models`, `GET /health`, `GET /metrics`.

Invariants:
- a request is validated completely (body size, JSON, fields, model name, sampling params,
  chat template, prompt ids, context length) before it reaches the engine; every failure is an
  OpenAI-style error body (`errors.py`) with a 4xx status, and leaves nothing behind;
- a request that reached the engine is aborted (slot and pages freed) whenever its client goes
  away first: a streaming response that is cancelled or fails to send, a non-streaming one
  whose connection closes while it waits (watched with `receive()`), a handler that raises;
- a request for `n` choices (of each prompt of a completion batch) runs as one engine request
  per choice (the prefix cache shares a prompt's pages); all of them are aborted together,
  and the response (or stream) carries every choice under its index (prompt * n + choice),
  with usage counting each prompt once; a prompt's log-probabilities (`echo` with `logprobs`,
  vLLM's `prompt_logprobs`) are computed by its first choice only and shared by its choices'
  renderers (a choice waits for them before its first chunk); `echo` with `max_tokens: 0`
  answers the prompt alone (the one token the engine sampled is left out, usage counts none);
- the tokenizer is only read here (encode, chat template, one-token decodes for logprobs);
  the engine itself is touched only through the `AsyncEngine`;
- tool calling (`tools.py`): `tools` reach the chat template; a forced `tool_choice` is a
  guided-JSON constraint whose output each choice's `ChatRenderer` turns into `tool_calls`;
- with `api_key`, every `/v1/*` route needs `Authorization: Bearer <key>` (401 otherwise);
  `/health` and `/metrics` stay open; CORS preflights (with `allowed_origins`) need no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vattention.engine.outputs import RequestOutput
from vattention.engine.sampling_params import SamplingParams, truncate_prompt
from vattention.models.tokenizer import template_ids
from vattention.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineShutdownError,
    EngineStepError,
    RequestStream,
)
from vattention.server.errors import APIError, bad_request, error_body
from vattention.server.metrics import CONTENT_TYPE, RequestTracker, ServerMetrics
from vattention.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_json,
    validate,
)
from vattention.server.render import (
    DONE,
    ChatRenderer,
    CompletionRenderer,
    SharedPrompt,
    merge_responses,
    prompt_only,
    sse,
)

logger = logging.getLogger("vattention.server")

DEFAULT_MAX_BODY_BYTES = 8 << 20
SNAPSHOT_TIMEOUT_S = 5.0


def create_app(
    async_engine: AsyncEngine,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_origins: Sequence[str] = (),
) -> FastAPI:
    """The API over `async_engine` (whose lifecycle stays the caller's), answering to the model
    name `served_model_name`. `allowed_origins` (e.g. `["*"]`) lets browser pages of those
    origins call it (CORS: preflights answered, any method and header); none by default."""
    app = FastAPI(title="vattention", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
            allow_headers=["*"],
        )  # fmt: skip
    server = _Server(async_engine, served_model_name, max_body_bytes)
    app.state.server = server
    metrics = server.metrics

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        metrics.request_errors.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {
            404: f"no route {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        metrics.request_errors.labels(status=str(exc.status_code)).inc()
        return JSONResponse(
            error_body(message, "invalid_request_error", None, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def on_crash(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
        metrics.request_errors.labels(status="500").inc()
        return JSONResponse(
            error_body("internal server error", "server_error", None, "internal_error"),
            status_code=500,
        )

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_crash)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_key):
            raise APIError(
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                HTTPStatus.UNAUTHORIZED,
                code="invalid_api_key",
            )

    auth = [Depends(check_key)]
    from vattention.server.utility_routes import register_utility_routes  # it imports app

    register_utility_routes(app, server, auth)  # /tokenize, /detokenize, /version
    from vattention.server.embeddings import register_embedding_routes  # it imports app

    register_embedding_routes(app, server, auth)  # /v1/embeddings

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.healthy:
            raise APIError("the engine is not running", HTTPStatus.SERVICE_UNAVAILABLE)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        try:
            snap = await asyncio.wait_for(async_engine.snapshot(), SNAPSHOT_TIMEOUT_S)
        except (asyncio.TimeoutError, EngineShutdownError, EngineDeadError):
            snap = None  # the request metrics are still worth a scrape
        return Response(metrics.render(snap), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> Response:
        card = {
            "id": served_model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "vattention",
            "root": async_engine.engine.config.model,
            "max_model_len": async_engine.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        body = parse_json(await _read_body(request, max_body_bytes))
        req: CompletionRequest = validate(CompletionRequest, body)
        server.check_model(req.model)
        params = req.to_sampling_params(async_engine.engine.sampling_defaults)
        server.check_bias(params)
        limit, k = async_engine.max_model_len, params.truncate_prompt_tokens
        prompts = [truncate_prompt(server.prompt_ids(p), k, limit) for p in req.prompt]
        for ids in prompts:
            server.check_length(len(ids), req.checked_max_tokens(params), "prompt", "max_tokens")
        rid = f"cmpl-{uuid.uuid4().hex}"
        # choice index = prompt * n + choice (OpenAI's order for a batch of prompts)
        jobs = [(ids, p) for ids in prompts for p in params.choices()]
        renderers = [
            CompletionRenderer(rid, served_model_name, async_engine.tokenizer, req.logprobs, i)
            for i in range(len(jobs))
        ]
        if req.echo:  # the prompt's text (and tokens) before each of its choices
            texts = [  # a truncated prompt is echoed as the ids that ran
                server.prompt_text(ids if k is not None else p, ids)
                for p, ids in zip(req.prompt, prompts, strict=True)
            ]
            for i, r in enumerate(renderers):
                r.echo = texts[i // params.n]
                if req.logprobs is not None:
                    r.echo_ids = prompts[i // params.n]
        if params.prompt_logprobs is not None:  # one SharedPrompt per prompt, for its choices
            shared = [SharedPrompt() for _ in prompts]
            for i, r in enumerate(renderers):
                r.prompt, r.prompt_logprobs = shared[i // params.n], req.prompt_logprobs
        return await server.serve(
            request, jobs, rid, renderers, req.stream, req.include_usage,
            sum(len(ids) for ids in prompts), req.prompt_only, req.priority, params.n,
        )  # fmt: skip

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        body = parse_json(await _read_body(request, max_body_bytes))
        req: ChatCompletionRequest = validate(ChatCompletionRequest, body)
        server.check_model(req.model)
        params = req.to_sampling_params(async_engine.engine.sampling_defaults)
        server.check_bias(params)
        ids = server.chat_prompt_ids(req)
        ids = truncate_prompt(ids, params.truncate_prompt_tokens, async_engine.max_model_len)
        which = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        server.check_length(len(ids), req.checked_max_tokens(params), "messages", which)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        top = (req.top_logprobs or 0) if req.logprobs else None
        renderers = [
            ChatRenderer(rid, served_model_name, async_engine.tokenizer, top, i, req.tool_plan)
            for i in range(params.n)
        ]
        if params.prompt_logprobs is not None:
            shared = SharedPrompt()
            for r in renderers:
                r.prompt, r.prompt_logprobs = shared, params.prompt_logprobs
        jobs = [(ids, p) for p in params.choices()]
        return await server.serve(
            request, jobs, rid, renderers, req.stream, req.include_usage, len(ids),
            priority=req.priority, n=params.n,
        )  # fmt: skip

    return app


class _Server:
    """What the routes share: the engine, the model name, the metrics, and request plumbing."""

    def __init__(self, engine: AsyncEngine, model: str, max_body_bytes: int) -> None:
        self.engine = engine
        self.model = model
        self.max_body_bytes = max_body_bytes
        self.metrics = ServerMetrics()
        self.created = int(time.time())

    # -- validation that needs the engine's facts ---------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model:
            raise APIError(
                f"The model `{model}` does not exist (this server serves `{self.model}`)",
                HTTPStatus.NOT_FOUND,
                param="model",
                code="model_not_found",
            )

    def check_bias(self, params: SamplingParams) -> None:
        vocab = self.engine.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise bad_request(
                f"logit_bias token id {max(params.logit_bias)} is outside the vocabulary "
                f"(size {vocab})",
                "logit_bias",
            )
        allowed = params.allowed_token_ids
        if allowed and max(allowed) >= vocab:
            raise bad_request(
                f"allowed_token_ids token id {max(allowed)} is outside the vocabulary "
                f"(size {vocab})",
                "allowed_token_ids",
            )

    def prompt_text(self, prompt: str | list[int], ids: list[int]) -> str:
        """A prompt as text (`echo`): the string sent, or its token ids decoded."""
        if isinstance(prompt, str):
            return prompt
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise bad_request("this model has no tokenizer: echo cannot show token ids", "echo")
        return str(tokenizer.decode(ids, skip_special_tokens=False))

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            tokenizer = self.engine.tokenizer
            if tokenizer is None:
                raise bad_request(
                    "this model has no tokenizer: send the prompt as token ids", "prompt"
                )
            ids = list(tokenizer.encode(prompt))  # as LLMEngine.add_request encodes text
        else:
            ids = list(prompt)
        vocab = self.engine.vocab_size
        if not ids:
            raise bad_request("the prompt has no tokens", "prompt")
        if max(ids) >= vocab:
            raise bad_request(
                f"prompt token id {max(ids)} is outside the vocabulary (size {vocab})", "prompt"
            )
        return ids

    def chat_prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise bad_request(
                "this model's tokenizer has no chat template, so /v1/chat/completions cannot "
                "format messages; use /v1/completions with a prompt",
                "messages",
                code="chat_template_missing",
            )
        kwargs = req.template_kwargs()
        try:
            rendered = tokenizer.apply_chat_template(req.message_dicts(), tokenize=True, **kwargs)
        except Exception as e:  # jinja's TemplateError (e.g. roles must alternate), ...
            raise bad_request(
                f"the chat template failed on these messages: {e}", "messages"
            ) from None
        return self.prompt_ids(template_ids(rendered))

    def check_length(self, n: int, max_tokens: int | None, what: str, max_name: str) -> None:
        limit = self.engine.max_model_len
        if n >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the {what} has "
                f"{n} tokens (no room for any output)",
                what,
                code="context_length_exceeded",
            )
        if max_tokens is not None and n + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but {n + max_tokens} "
                f"were requested ({n} in the {what}, {max_tokens} for the completion)",
                max_name,
                code="context_length_exceeded",
            )

    # -- generation -------------------------------------------------------------------------
    async def serve(
        self, request: Request, jobs: list[tuple[list[int], SamplingParams]], rid: str,
        renderers: Sequence[CompletionRenderer | ChatRenderer], stream: bool,
        include_usage: bool, prompt_tokens: int, echo_only: bool = False, priority: int = 0,
        n: int = 1,
    ) -> Response:  # fmt: skip
        """Run every choice (a prompt and its `n == 1` params) as an engine request (`rid`, or
        `rid-i` for several: choices of one prompt share its pages through the prefix cache)
        and answer with all of them; `prompt_tokens` is the usage's prompt count; `echo_only`
        (`echo` with `max_tokens: 0`) leaves the generated token out of the answer."""
        streams: list[RequestStream] = []
        trackers: list[RequestTracker] = []
        try:
            for i, (ids, p) in enumerate(jobs):
                trackers.append(self.metrics.tracker())
                sub_id = rid if len(jobs) == 1 else f"{rid}-{i}"
                streams.append(await self.engine.add_request(ids, p, sub_id, priority))
        except BaseException as e:
            self._ended(streams, trackers[: len(streams)])
            if isinstance(e, (ValueError, TypeError)):
                raise bad_request(str(e), "prompt") from None
            if isinstance(e, (EngineShutdownError, EngineDeadError)):
                raise APIError(str(e), HTTPStatus.SERVICE_UNAVAILABLE) from None
            raise
        if stream:
            events = self._events(
                streams, renderers, trackers, include_usage, prompt_tokens, echo_only, n
            )
            return _SSEResponse(events, on_close=lambda: self._ended(streams, trackers))
        work = asyncio.gather(
            *(self._final(s, t) for s, t in zip(streams, trackers, strict=True)),
            return_exceptions=True,  # every choice runs to its end; the first error is raised
        )
        try:
            finals = await _until_disconnect(request, work)
        finally:
            self._ended(streams, trackers)
        if finals is None:  # the client went away: nobody reads this
            return Response(status_code=499)
        for f in finals:
            if isinstance(f, BaseException):
                raise f
        if echo_only:
            finals = [prompt_only(f) for f in finals]
        for r, f in zip(renderers, finals, strict=True):
            r.ready(f)  # every prompt's log-probabilities reach its choices before rendering
        bodies = [r.response(f) for r, f in zip(renderers, finals, strict=True)]
        return JSONResponse(merge_responses(bodies, list(finals), prompt_tokens, n))

    async def _final(self, stream: RequestStream, tracker: RequestTracker) -> RequestOutput:
        last: RequestOutput | None = None
        try:
            async for out in stream:
                _observe(tracker, out)
                last = out
        except (EngineStepError, EngineDeadError, EngineShutdownError) as e:
            raise _engine_error(e) from None
        assert last is not None and last.finished
        return last

    async def _events(
        self, streams: list[RequestStream],
        renderers: Sequence[CompletionRenderer | ChatRenderer],
        trackers: list[RequestTracker], include_usage: bool, prompt_tokens: int,
        echo_only: bool = False, n: int = 1,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        """SSE chunks of every choice as its outputs come (choices interleave; each chunk
        names its choice's index), then usage over all of them, then [DONE]. A choice whose
        prompt's log-probabilities are not known yet (another choice computes them) is held:
        its latest output is rendered once they are, or when every stream has ended."""
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for out in streams[i]:
                    await queue.put((i, out))
                await queue.put((i, None))
            except BaseException as e:  # an engine error ends the response
                await queue.put((i, e))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
        try:
            for r in renderers:
                if isinstance(r, ChatRenderer):
                    yield sse(r.role_chunk(include_usage))
            last: list[RequestOutput | None] = [None] * len(streams)
            held: dict[int, RequestOutput] = {}  # latest outputs waiting for prompt logprobs
            running = len(streams)
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    if isinstance(item, (EngineStepError, EngineDeadError, EngineShutdownError)):
                        yield sse(_engine_error(item).body())
                        break
                    raise item
                _observe(trackers[i], item)
                if echo_only:
                    item = prompt_only(item)
                last[i] = item
                if not renderers[i].ready(item):
                    held[i] = item  # outputs are cumulative: the latest one is enough
                    continue
                for chunk in renderers[i].chunks(item, include_usage):
                    yield sse(chunk)
                for j in [j for j in held if renderers[j].ready(held[j])]:
                    for chunk in renderers[j].chunks(held.pop(j), include_usage):
                        yield sse(chunk)
            else:
                for j, out in held.items():  # their prompt's first choice ended without them
                    for chunk in renderers[j].chunks(out, include_usage):
                        yield sse(chunk)
                finals = [x for x in last if x is not None]
                if include_usage and len(finals) == len(last):
                    yield sse(renderers[0].usage_chunk(finals, prompt_tokens, n))
        finally:
            for t in tasks:
                t.cancel()
        yield DONE

    def _ended(self, streams: list[RequestStream], trackers: list[RequestTracker]) -> None:
        """The response is over (sent, failed or abandoned): abort the requests still running."""
        for stream in streams:
            stream.abort()  # a no-op once it finished
        for tracker in trackers:
            if not tracker.done:
                tracker.observe(0, 0, "abort")


class _SSEResponse(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (sent, cancelled on a
    disconnect, failed to send), so an abandoned request is aborted at once."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await `work`; None (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(
        f"the request body is larger than {limit} bytes",
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        code="request_too_large",
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _observe(tracker: RequestTracker, out: RequestOutput) -> None:
    reason = out.outputs[0].finish_reason if out.finished else None
    tracker.observe(len(out.prompt_token_ids), len(out.outputs[0].token_ids), reason)


def _engine_error(e: BaseException) -> APIError:
    if isinstance(e, EngineShutdownError):
        return APIError(str(e), HTTPStatus.SERVICE_UNAVAILABLE)
    return APIError(str(e), HTTPStatus.INTERNAL_SERVER_ERROR, code="engine_error")
