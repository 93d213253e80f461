"""Shared fixtures for KV-cache tests: a backend per kind (CPU always, CUDA on the GPU)."""

from __future__ import annotations

import pytest
import torch

from vattention.kvcache.spec import KVCacheSpec

CPU_PAGE = 64 * 1024

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_spec(kind: str, layout: str = "cross_layer", **overrides: object) -> KVCacheSpec:
    """A small spec whose slots span several pages on either backend.

    CPU: 64 KiB pages; CUDA: the driver's 2 MiB pages, so tokens carry more bytes there.
    """
    if kind == "cpu":
        base: dict[str, object] = dict(
            num_layers=3,
            num_kv_heads=2,
            head_dim=16,
            max_slots=4,
            max_seq_len=700,
            dtype=torch.float32,
            page_size=CPU_PAGE,
        )
    else:
        base = dict(
            num_layers=4,
            num_kv_heads=8,
            head_dim=128,
            max_slots=4,
            max_seq_len=2000,
            dtype=torch.float16,
            page_size=None,
        )
    base["layout"] = layout
    base.update(overrides)
    return KVCacheSpec(**base)  # type: ignore[arg-type]
