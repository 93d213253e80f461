"""vattention: LLM serving on a KV cache kept contiguous in virtual memory.

The memory library (`vattention.memory`, `vattention.kvcache`) works on its own; the engine builds
on it. Public names are imported lazily so that `import vattention` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "KVCacheSpec": "vattention.kvcache.spec",
    "VirtualKVCache": "vattention.kvcache.virtual",
    "OutOfKVMemory": "vattention.memory.errors",
    "PagedKVCache": "vattention.kvcache.paged",
    "LLM": "vattention.engine.llm",
    "SamplingParams": "vattention.engine.sampling_params",
    "GuidedDecodingParams": "vattention.engine.structured",
    "PoolingParams": "vattention.engine.pooling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vattention' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
