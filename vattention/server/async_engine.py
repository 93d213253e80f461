"""`AsyncEngine`: an `LLMEngine` driven by one dedicated thread, with asyncio streams per request.

The engine is not thread-safe, so exactly one thread (the engine thread) ever touches it after
start-up; the one exception is its grammar compiler (`LLMEngine.grammar_backend`, locked):
`add_request` compiles a structured-output request's grammar on a worker thread before
queueing it, so a new schema never stalls the engine thread. Other threads talk to it through a command queue guarded by one condition variable:
`add`, `abort` and `call` (run a function on the engine between steps). The thread loops:
take every queued command and apply it, then `step(include_running=True)` while there is work;
with no work and no command it waits on the condition (no busy spinning).

Invariants:
- commands are applied in the order they were queued, always between two steps; so an abort
  queued after an add always finds (and ends) that request;
- every request added has exactly one `RequestStream`; the engine thread delivers its outputs
  with `loop.call_soon_threadsafe` (one call per loop per step) into the stream's
  `asyncio.Queue`; the last item delivered is a finished `RequestOutput` or an exception, after
  which the engine forgets the stream;
- outputs are cumulative (text and token ids so far), so a consumer that falls behind gets only
  the latest one: nothing is lost by skipping intermediate outputs;
- a consumer that stops iterating (`aclose`, cancellation on a client disconnect, leaving an
  `async with`) aborts its request at once: the engine thread frees its slot (and so its pages
  go back to the cache) before it runs the next step;
- errors of `add_request` (`ValueError`, `TypeError`) are raised to the caller of
  `add_request`/`generate` before any output; an exception inside `step()` is logged, every
  request in flight fails with `EngineStepError`, the engine is reset and keeps serving (if the
  reset itself fails the engine is dead: `EngineDeadError` for everyone, `healthy` False);
- `shutdown()` stops admitting (`EngineShutdownError`), aborts the requests in flight (their
  streams end with finish reason "abort"), joins the thread, then `engine.close()` (unmaps
  everything); it is idempotent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vattention.engine.llm_engine import EngineConfig, LLMEngine
from vattention.engine.outputs import RequestOutput
from vattention.engine.pooling import PoolingParams
from vattention.engine.sampling_params import SamplingParams

logger = logging.getLogger("vattention.server")

T = TypeVar("T")


class EngineStepError(RuntimeError):
    """The engine failed while running this request's step; the request was ended."""


class EngineDeadError(RuntimeError):
    """The engine thread could not recover from an error; nothing more is served."""


class EngineShutdownError(RuntimeError):
    """The engine is shutting down and admits no new request."""


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine and KV-cache figures read on the engine thread between two steps."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_stats: dict[str, float] = field(default_factory=dict)
    kv_cache: str = ""
    num_steps: int = 0
    num_step_errors: int = 0
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of them, served from cached pages
    cascade_steps: int = 0  # decode steps that attended a shared prefix once (cascade)


class RequestStream:
    """The outputs of one request, as an async iterator; ending it early aborts the request."""

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._abort = abort
        self.finished = False  # the last output (or an error) was handed out, or it was aborted

    def _put(self, item: RequestOutput | BaseException) -> None:  # on the stream's loop
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled (e.g. the client went away): end the request
            self.abort()
            raise
        while not self._queue.empty():  # outputs are cumulative: keep only the latest
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """End the request now unless it already ended (idempotent, never blocks)."""
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


class AsyncEngine:
    """Owns an `LLMEngine` and the one thread that runs it; see the module docstring."""

    def __init__(self, engine: LLMEngine, start: bool = True) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: deque[tuple[Any, ...]] = deque()
        self._streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._accepting = True
        self._stop_requested = False
        self._thread_done = False
        self._closed = False
        self._dead: BaseException | None = None
        self._flush = False  # aborted requests whose final outputs a step still has to collect
        self.num_steps = 0
        self.num_step_errors = 0
        self._thread = threading.Thread(target=self._run, name="vattention-engine", daemon=True)
        if start:
            self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    def start(self) -> None:
        self._thread.start()

    # -- properties read by the HTTP layer (immutable engine facts) --------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model_config.vocab_size)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._dead is None and self._accepting

    # -- requests ----------------------------------------------------------------------------
    async def add_request(
        self, prompt: str | list[int], params: SamplingParams | PoolingParams, request_id: str,
        priority: int = 0,
    ) -> RequestStream:  # fmt: skip
        """Queue a request; returns its stream once the engine accepted it. `ValueError` and
        `TypeError` from the engine (prompt too long, bad ids, duplicate id) are raised here."""
        if not self._accepting:
            raise EngineShutdownError("the server is shutting down")
        spec = getattr(params, "guided_decoding", None)  # (bad params: the engine says why)
        if spec is not None:  # compile here (cached by spec), not on the engine thread
            await asyncio.to_thread(lambda: self.engine.grammar_backend().compile(spec))
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, self.abort)
        future: cf.Future[None] = cf.Future()
        self._submit(("add", stream, loop, prompt, params, priority, future))
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been added meanwhile: do not leak it
            raise
        return stream

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes; stopping early aborts it."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it is unknown or over); safe from any thread."""
        # (once it stops, the engine ends every request itself)
        with contextlib.suppress(EngineShutdownError, EngineDeadError):
            self._submit(("abort", request_id))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between two steps and return its result."""
        future: cf.Future[T] = cf.Future()
        self._submit(("call", fn, future))
        return await asyncio.wrap_future(future)

    def call_sync(self, fn: Callable[[LLMEngine], T], timeout: float | None = 30.0) -> T:
        """`call` for a thread without an event loop (blocks; never from the engine thread)."""
        future: cf.Future[T] = cf.Future()
        self._submit(("call", fn, future))
        return future.result(timeout)

    async def snapshot(self) -> EngineSnapshot:
        return await self.call(self._take_snapshot)

    # -- shutdown ----------------------------------------------------------------------------
    def shutdown(self, timeout: float | None = 60.0) -> None:
        """Stop admitting, abort in-flight requests, join the thread, close the engine."""
        self._accepting = False
        with self._cond:
            self._stop_requested = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error(
                    "the engine thread did not stop in %s s; the engine stays open", timeout
                )
                return
        if not self._closed:
            self._closed = True
            self.engine.close()
            logger.info("engine closed")

    async def ashutdown(self, timeout: float | None = 60.0) -> None:
        await asyncio.to_thread(self.shutdown, timeout)

    # -- the engine thread -------------------------------------------------------------------
    def _submit(self, command: tuple[Any, ...]) -> None:
        with self._cond:
            if self._dead is not None:
                raise EngineDeadError(f"the engine failed and cannot serve: {self._dead!r}")
            if self._thread_done:
                raise EngineShutdownError("the engine has stopped")
            self._commands.append(command)
            self._cond.notify()

    def _has_work(self) -> bool:
        return self._flush or self.engine.has_unfinished_requests()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stop_requested or self._has_work()):
                        self._cond.wait()
                    commands = list(self._commands)
                    self._commands.clear()
                    stop = self._stop_requested
                for command in commands:
                    self._apply(command)
                if stop:
                    break
                if self._has_work():
                    self._step()
        except BaseException as e:  # a bug in this loop: say so, fail everyone
            logger.exception("the engine thread crashed")
            self._dead = e
            self._fail_all(EngineDeadError(f"the engine thread crashed: {e!r}"))
        finally:
            self._drain_on_stop()

    def _apply(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            _, stream, loop, prompt, params, priority, future = command
            if not future.set_running_or_notify_cancel():
                return  # the caller went away before it was added
            try:
                self.engine.add_request(prompt, params, stream.request_id, priority=priority)
            except BaseException as e:
                future.set_exception(e)
                return
            self._streams[stream.request_id] = (stream, loop)
            future.set_result(None)
        elif kind == "abort":
            if self.engine.abort_request(command[1]):
                self._flush = True
            self._streams.pop(command[1], None)
        elif kind == "call":
            _, fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as e:
                    future.set_exception(e)

    def _step(self) -> None:
        self._flush = False
        try:
            outputs = self.engine.step(include_running=True)
        except Exception as e:
            self.num_step_errors += 1
            logger.exception("engine step failed; ending the requests in flight")
            self._fail_all(EngineStepError(f"the engine failed while running the request: {e!r}"))
            try:
                reset_engine(self.engine)
            except Exception as reset_error:
                logger.exception("could not reset the engine after a failed step")
                self._dead = reset_error
                raise
            return
        self.num_steps += 1
        self._deliver((out.request_id, out) for out in outputs)

    def _deliver(self, items: Any) -> None:
        """Hand (request id, output or exception) pairs to their streams, one call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for rid, item in items:
            entry = self._streams.get(rid)
            if entry is None:
                continue  # aborted by its consumer
            if isinstance(item, BaseException) or item.finished:
                del self._streams[rid]
            by_loop.setdefault(entry[1], []).append((entry[0], item))
        for loop, batch in by_loop.items():
            # (a closed loop raises RuntimeError: nobody is listening there any more)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, batch)

    def _fail_all(self, error: BaseException) -> None:
        self._deliver([(rid, error) for rid in list(self._streams)])
        self._streams.clear()

    def _drain_on_stop(self) -> None:
        """Abort everything in flight, hand out the final outputs, refuse queued commands."""
        self._accepting = False
        if self._dead is None:
            try:
                for rid in list(self.engine.scheduler.requests):
                    self.engine.abort_request(rid)
                for _ in range(1000):
                    self._step()
                    if not self.engine.has_unfinished_requests() or self._dead is not None:
                        break
            except Exception:
                logger.exception("error while stopping the engine")
        self._fail_all(EngineShutdownError("the server shut down before the request finished"))
        with self._cond:
            self._thread_done = True
            pending = list(self._commands)
            self._commands.clear()
        for command in pending:
            future = command[-1] if command[0] in ("add", "call") else None
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(EngineShutdownError("the engine has stopped"))

    def _take_snapshot(self, engine: LLMEngine) -> EngineSnapshot:
        stats = engine.cache.stats()
        as_dict = stats.as_dict() if hasattr(stats, "as_dict") else dict(vars(stats))
        numeric = {
            k: float(v)
            for k, v in as_dict.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        sched = engine.scheduler
        prefix = getattr(sched, "prefix", None)
        return EngineSnapshot(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_preemptions=sched.num_preemptions,
            kv_stats=numeric,
            kv_cache=engine.config.kv_cache,
            num_steps=self.num_steps,
            num_step_errors=self.num_step_errors,
            prefix_query_tokens=prefix.query_tokens if prefix is not None else 0,
            prefix_hit_tokens=prefix.hit_tokens if prefix is not None else 0,
            cascade_steps=getattr(engine.runner, "cascade_steps", 0),
        )


def _put_all(batch: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in batch:
        stream._put(item)


def reset_engine(engine: LLMEngine) -> None:
    """After a failed step: abort every request and drop the launched steps (`engine.reset`)."""
    engine.reset()
    if engine.scheduler.has_unfinished_requests():
        raise RuntimeError("requests are left in the scheduler after the reset")
