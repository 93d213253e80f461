"""`AsyncEngine` on its own: add errors reach the caller, a consumer that stops aborts its
request (slot and pages freed), an idle engine does not spin, a failing step fails only the
requests in flight, shutdown aborts what runs and closes the cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import MAX_MODEL_LEN, VOCAB, engine_config, idle, slowed, wait_until
from vattention import SamplingParams
from vattention.server.async_engine import AsyncEngine, EngineShutdownError, EngineStepError

LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[AsyncEngine]:
    e = AsyncEngine.from_config(engine_config(model_dir))
    yield e
    e.shutdown()


def test_add_errors_reach_the_caller(engine: AsyncEngine) -> None:
    async def main() -> None:
        p = SamplingParams(max_tokens=2)
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request([3] * MAX_MODEL_LEN, p, "too-long")
        with pytest.raises(ValueError, match="vocabulary"):
            await engine.add_request([3, VOCAB], p, "bad-id")
        with pytest.raises(ValueError, match="negative"):
            await engine.add_request([3, -1], p, "negative")
        with pytest.raises(TypeError):
            await engine.add_request([3, 4], "not params", "bad-params")  # type: ignore[arg-type]
        stream = await engine.add_request([3, 4], p, "dup")
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request([5, 6], p, "dup")
        outs = [o async for o in stream]
        assert outs[-1].finished and len(outs[-1].token_ids) <= 2

    asyncio.run(main())
    assert idle(engine)


def test_outputs_stream_and_match_the_engine_text(engine: AsyncEngine) -> None:
    async def main() -> list[Any]:
        return [o async for o in engine.generate("Hello", SamplingParams(temperature=0), "g")]

    outs = asyncio.run(main())
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    assert [len(o.token_ids) for o in outs] == sorted(len(o.token_ids) for o in outs)
    assert all(outs[-1].text.startswith(o.text) for o in outs)


@pytest.mark.parametrize("how", ["aclose", "cancel", "break"])
def test_a_consumer_that_stops_aborts_its_request(engine: AsyncEngine, how: str) -> None:
    async def main() -> None:
        agen = engine.generate([5, 6, 7], LONG, f"stop-{how}")
        if how == "aclose":
            first = await agen.__anext__()
            assert not first.finished
            await agen.aclose()
        elif how == "break":
            async for _ in agen:
                break
            await agen.aclose()
        else:

            async def consume() -> None:
                async for _ in agen:
                    pass

            task = asyncio.ensure_future(consume())
            await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with slowed(engine):  # 200 steps take >= 4 s: the consumer stops long before the end
        asyncio.run(main())
    wait_until(lambda: idle(engine), what="the aborted request to free its slot")
    stats = engine.call_sync(lambda e: e.cache.stats())
    assert stats.slots_used == 0 and stats.used_mapped_bytes == 0


def test_an_idle_engine_does_not_spin(engine: AsyncEngine) -> None:
    wait_until(lambda: idle(engine))
    steps, cpu = engine.num_steps, time.process_time()
    time.sleep(0.3)
    assert engine.num_steps == steps
    assert time.process_time() - cpu < 0.1


def test_a_failing_step_fails_the_requests_in_flight_and_the_engine_goes_on(
    engine: AsyncEngine,
) -> None:
    def arm(e: Any) -> None:
        original = e.runner.execute

        def boom(*args: Any, **kwargs: Any) -> Any:
            e.runner.execute = original
            raise RuntimeError("injected")

        e.runner.execute = boom

    async def run(rid: str) -> list[Any]:
        return [o async for o in engine.generate([9, 8, 7], SamplingParams(max_tokens=4), rid)]

    async def main() -> None:
        engine.call_sync(arm)
        results = await asyncio.gather(run("f1"), run("f2"), return_exceptions=True)
        assert all(isinstance(r, EngineStepError) for r in results), results
        after = await run("after")
        assert after[-1].finished and len(after[-1].token_ids) == 4

    asyncio.run(main())
    assert idle(engine) and engine.healthy


def test_shutdown_aborts_in_flight_requests_and_closes_the_cache(model_dir: Path) -> None:
    e = AsyncEngine.from_config(engine_config(model_dir))
    cache = e.engine.cache
    backend = cache._backend

    async def main() -> None:
        stream = await e.add_request([5, 6, 7], LONG, "inflight")
        first = await stream.__anext__()
        assert not first.finished
        await e.ashutdown()
        rest = [o async for o in stream]
        assert rest and rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineShutdownError):
            await e.add_request([1, 2], SamplingParams(), "late")

    asyncio.run(main())
    assert cache.closed and backend.num_mappings == 0 and backend.num_pages == 0
    assert not e.healthy
    e.shutdown()  # idempotent
    with pytest.raises(EngineShutdownError):
        e.call_sync(lambda eng: None)
