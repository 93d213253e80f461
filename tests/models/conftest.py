"""Fixtures for the model tests (helpers live in `model_helpers.py`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import build_hf


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[torch.nn.Module, Path]]:
    """Factory: (HF model, directory it was saved to with safetensors)."""

    def make(kind: str = "llama", max_shard_size: str | None = None, **overrides: Any):
        model = build_hf(kind, **overrides)
        out = tmp_path / kind
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, **kw)
        return model, out

    return make
