"""Graceful shutdown: uvicorn stops (cancelling what still streams after the grace period),
then the engine aborts what is left and closes the cache, which leaves no mapping and no page;
`run_server` in its own process exits 0 on SIGTERM and on SIGINT, closing the engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL, engine_config, serving, slowed, wait_until
from vattention.server.async_engine import AsyncEngine
from vattention.server.serve import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_stop_with_a_request_in_flight_closes_the_cache(model_dir: Path) -> None:
    engine = AsyncEngine.from_config(engine_config(model_dir))
    cache = engine.engine.cache
    backend = cache._backend
    lines: list[str] = []
    started = threading.Event()

    def stream(url: str) -> None:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 250, "ignore_eos": True,
                "stream": True}  # fmt: skip
        try:
            with httpx.stream("POST", url, json=body, timeout=30) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()
        except httpx.HTTPError:
            pass  # the server may cut the stream: that is the point
        finally:
            started.set()

    with serving(engine, graceful_shutdown_s=0.1) as running, slowed(engine):
        client = threading.Thread(target=stream, args=(running.base_url + "/completions",))
        client.start()
        assert started.wait(30) and lines
        assert engine.call_sync(lambda e: e.scheduler.num_running) == 1  # still generating
        running.stop()  # what SIGINT/SIGTERM do: uvicorn's shutdown ...
        engine.shutdown()  # ... then the engine's
        client.join(30)
        assert not client.is_alive()
    assert cache.closed
    assert backend.num_mappings == 0 and backend.num_pages == 0
    assert not engine.healthy


SCRIPT = """
import sys
from vattention.engine.llm_engine import EngineConfig
from vattention.server.serve import run_server
config = EngineConfig(model=sys.argv[1], dtype="float32", device="cpu", max_model_len=128,
                      max_num_seqs=4, kv_page_size=64 * 1024)
run_server(config, port=int(sys.argv[2]), served_model_name="tiny", api_key="k")
print("run_server returned", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_server_exits_cleanly_on_a_signal(model_dir: Path, sig: signal.Signals) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(model_dir), str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, what="the server to start")
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        time.sleep(0.1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "engine closed" in err and "run_server returned" in out
