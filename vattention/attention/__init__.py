"""Attention backends, selectable by name.

Importing this package imports every backend module beside it (contiguous and paged), so each
registers itself with `base.register_backend`; `create_backend(name, cache, num_heads,
num_kv_heads, head_dim)` then builds one. `auto` is the default. A module whose optional
dependency is missing (e.g. Triton) is skipped, not fatal.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from vattention.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    KVCacheView,
    backend_names,
    get_backend_class,
    register_backend,
)

DEFAULT_BACKEND = "auto"
_NOT_BACKENDS = {"base", "contiguous", "decode_kernels"}


def _import_backends() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_BACKENDS or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except ImportError as err:  # an optional dependency is missing
            if err.name is None or err.name.startswith("vattention"):
                raise


def create_backend(
    name: str,
    cache: KVCacheView,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float | None = None,
    **options: Any,
) -> AttentionBackend:
    """Build the backend registered as `name` over `cache` (options go to its constructor)."""
    return get_backend_class(name)(cache, num_heads, num_kv_heads, head_dim, scale, **options)


_import_backends()

__all__ = [
    "DEFAULT_BACKEND",
    "AttentionBackend",
    "AttentionMetadata",
    "KVCacheView",
    "backend_names",
    "create_backend",
    "get_backend_class",
    "register_backend",
]
