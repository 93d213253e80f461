"""The OpenAI-compatible HTTP server (`vattention serve`).

Modules, one concern each: `async_engine` (the engine on its own thread, asyncio streams per
request), `protocol` (request models and their mapping to `SamplingParams`), `errors`
(OpenAI-style error bodies), `render` (response bodies and SSE chunks), `metrics`
(Prometheus), `app` (`create_app`: the FastAPI routes), `serve` (`run_server`: uvicorn and
signals). Names are imported lazily so that `import vattention.server` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "AsyncEngine": "vattention.server.async_engine",
    "create_app": "vattention.server.app",
    "run_server": "vattention.server.serve",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vattention.server' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
