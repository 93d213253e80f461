"""`run_server`: build the engine and the app, serve them with uvicorn, shut down cleanly.

Shutdown order, however it is triggered (SIGINT, SIGTERM, `should_exit`, an error): uvicorn
stops accepting connections and gives the requests in flight `GRACEFUL_SHUTDOWN_S` seconds to
finish (then cancels them, which aborts their engine requests); then the engine stops
admitting, aborts what is left, joins its thread and closes (the KV cache unmaps everything).
A signal ends `run_server` normally: it is not re-raised afterwards (uvicorn's default), so the
process exits with status 0 after a clean shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator, Sequence

import uvicorn

from vattention.engine.llm_engine import EngineConfig
from vattention.server.app import DEFAULT_MAX_BODY_BYTES, create_app
from vattention.server.async_engine import AsyncEngine

logger = logging.getLogger("vattention.server")

GRACEFUL_SHUTDOWN_S = 5


class Server(uvicorn.Server):
    """uvicorn's server that handles SIGINT/SIGTERM without re-raising them on exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals can only be handled on the main thread
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def build_server(
    async_engine: AsyncEngine,
    served_model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    log_level: str = "info",
    graceful_shutdown_s: float = GRACEFUL_SHUTDOWN_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_origins: Sequence[str] = (),
) -> Server:
    """The uvicorn server of the app over `async_engine` (not started)."""
    app = create_app(async_engine, served_model_name, api_key, max_body_bytes, allowed_origins)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_shutdown_s,  # type: ignore[arg-type]
        access_log=log_level == "debug",
    )
    return Server(config)


def run_server(
    engine_config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    log_level: str = "info",
    allowed_origins: Sequence[str] = (),
) -> None:
    """Serve `engine_config`'s model on http://host:port/v1 until SIGINT or SIGTERM."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    async_engine = AsyncEngine.from_config(engine_config)
    try:
        server = build_server(
            async_engine, served_model_name or engine_config.model, host, port, api_key,
            log_level, allowed_origins=allowed_origins,
        )  # fmt: skip
        server.run()
    finally:
        async_engine.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and examples)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
