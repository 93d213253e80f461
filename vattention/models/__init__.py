"""Llama-family models (Llama 2/3, Mistral, Qwen2, Qwen3, Yi): config, layers, weight loader, presets,
GGUF conversion and built-in models.

Entry points: `load_model(path_or_preset, dtype, device, load_format)` -> `LlamaForCausalLM`,
`load_tokenizer(path, fallback=False)`, `ModelConfig`, `get_preset`; `resolve_model(name)` turns
a `.gguf` file or a built-in name (`DEFAULT_MODEL`, `builtin_names()`) into a local HF-style
directory (converted once, cached: `vattention.models.gguf`).
"""

from __future__ import annotations

from vattention.models.builtin import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModelNotInstalled,
    builtin_gguf_path,
    builtin_names,
)
from vattention.models.config import ModelConfig, RopeScaling
from vattention.models.llama import LlamaForCausalLM, last_token_indices
from vattention.models.loader import load_model
from vattention.models.presets import PRESETS, get_preset, preset_names
from vattention.models.resolve import resolve_model
from vattention.models.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "PRESETS",
    "BuiltinModelNotInstalled",
    "ByteTokenizer",
    "LlamaForCausalLM",
    "ModelConfig",
    "RopeScaling",
    "builtin_gguf_path",
    "builtin_names",
    "get_preset",
    "last_token_indices",
    "load_model",
    "load_tokenizer",
    "preset_names",
    "resolve_model",
]
