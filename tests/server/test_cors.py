"""CORS (`vattention serve --allowed-origins`): off by default; with origins, browser pages of
those origins get the `Access-Control-Allow-*` headers and preflights are answered without the
API key (the key still guards the request itself)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import engine_config, serving
from vattention.cli import _origins, build_parser
from vattention.server.app import create_app
from vattention.server.async_engine import AsyncEngine

ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[AsyncEngine]:
    engine = AsyncEngine.from_config(engine_config(model_dir))
    yield engine
    engine.shutdown()


def _client(engine: AsyncEngine, **kw: object) -> TestClient:
    return TestClient(create_app(engine, "tiny", **kw))  # type: ignore[arg-type]


def _preflight() -> dict[str, str]:
    return {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip


def test_no_cors_headers_by_default(engine: AsyncEngine) -> None:
    with _client(engine) as c:
        r = c.get("/v1/models", headers={"Origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.options("/v1/chat/completions", headers=_preflight())
        assert "access-control-allow-origin" not in r.headers


def test_allowed_origin_gets_headers_and_preflights_need_no_key(engine: AsyncEngine) -> None:
    with _client(engine, api_key="k", allowed_origins=[ORIGIN]) as c:
        r = c.options("/v1/chat/completions", headers=_preflight())
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
        r = c.get("/v1/models", headers={"Origin": ORIGIN})
        assert r.status_code == 401  # the key still guards the route
        assert r.headers["access-control-allow-origin"] == ORIGIN
        r = c.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = c.get("/v1/models", headers={"Origin": "http://evil.example",
                                               "Authorization": "Bearer k"})  # fmt: skip
        assert "access-control-allow-origin" not in r.headers


def test_served_with_a_wildcard(model_dir: Path) -> None:
    engine = AsyncEngine.from_config(engine_config(model_dir))
    with serving(engine, allowed_origins=["*"]) as running:
        r = httpx.get(running.url + "/health", headers={"Origin": ORIGIN}, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_origins_flag_forms() -> None:
    assert _origins("*") == ["*"]
    assert _origins("http://a, http://b") == ["http://a", "http://b"]
    assert _origins('["http://a", "http://b"]') == ["http://a", "http://b"]
    args = build_parser().parse_args(["serve", "m", "--allowed-origins", '["*"]'])
    assert args.allowed_origins == ["*"]
    assert build_parser().parse_args(["serve", "m"]).allowed_origins == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--allowed-origins", "[1, 2]"])
