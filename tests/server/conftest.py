"""Fixtures of the server tests: a tiny random Llama (vocab 300, so the byte-level tokenizer
fallback encodes text), engines on the CPU in float32, and real uvicorn servers on 127.0.0.1
in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.engine.llm_helpers import save_tiny
from vattention import LLM
from vattention.engine.llm_engine import EngineConfig
from vattention.server.app import DEFAULT_MAX_BODY_BYTES
from vattention.server.async_engine import AsyncEngine
from vattention.server.serve import Server, build_server

MODEL = "tiny"
MAX_MODEL_LEN = 256
VOCAB = 300
# A stand-in chat template (the fallback tokenizer renders `<|role|>\ncontent\n` itself).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def engine_config(path: Path, **overrides: Any) -> EngineConfig:
    opts: dict[str, Any] = dict(
        model=str(path),
        dtype="float32",
        device="cpu",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=16,
        kv_page_size=64 * 1024,
    )
    opts.update(overrides)
    return EngineConfig(**opts)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("server") / "tiny-llama"
    save_tiny("llama", path, vocab_size=VOCAB)
    return path


@dataclass
class Running:
    """A started server: its engine, uvicorn server, thread and address."""

    engine: AsyncEngine
    server: Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def serving(
    engine: AsyncEngine,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    graceful_shutdown_s: float = 1.0,
    allowed_origins: tuple[str, ...] | list[str] = (),
) -> Iterator[Running]:
    """Serve `engine` on a free port until the block ends; then stop uvicorn, then the engine."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(
        engine, MODEL, port=port, api_key=api_key, log_level="warning",
        graceful_shutdown_s=graceful_shutdown_s, max_body_bytes=max_body_bytes,
        allowed_origins=allowed_origins,
    )  # fmt: skip
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    running = Running(engine, server, thread, port)
    try:
        yield running
    finally:
        if thread.is_alive():
            running.stop()
        engine.shutdown()
        sock.close()


# A chat-capable server, the same engine as an offline `LLM` (the reference its answers are
# checked against), and an OpenAI client of the server: one each per test module that uses
# them (modules that need another server define their own `served`).
@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[Running]:
    engine = AsyncEngine.from_config(engine_config(model_dir))
    engine.tokenizer.chat_template = CHAT_TEMPLATE
    with serving(engine) as running:
        yield running


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> Iterator[LLM]:
    config = engine_config(model_dir)
    kwargs = {k: getattr(config, k) for k in ("dtype", "device", "max_model_len", "kv_page_size")}
    with LLM(str(model_dir), max_num_seqs=16, **kwargs) as reference:
        yield reference


@pytest.fixture(scope="module")
def client(served: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0)


@contextlib.contextmanager
def slowed(engine: AsyncEngine, seconds: float = 0.02) -> Iterator[None]:
    """Each engine step takes at least `seconds` more inside the block, so a test can observe a
    request mid-generation however fast the machine runs the tiny model."""
    real = engine.call_sync(lambda e: e.step)

    def step(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real(*args, **kwargs)

    engine.call_sync(lambda e: setattr(e, "step", step))
    try:
        yield
    finally:
        if engine.healthy:  # a stopped engine has nothing left to restore
            engine.call_sync(lambda e: e.__dict__.pop("step", None))


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def idle(engine: AsyncEngine) -> bool:
    """No request in the engine and no KV slot in use."""

    def check(e: Any) -> bool:
        stats = e.cache.stats()
        return not e.has_unfinished_requests() and stats.slots_used == 0

    return bool(engine.call_sync(check))
