"""Llama-family models (Llama 2/3, Mistral, Qwen2, Yi): config, layers, weight loader, presets.

Entry points: `load_model(path_or_preset, dtype, device, load_format)` -> `LlamaForCausalLM`,
`load_tokenizer(path, fallback=False)`, `ModelConfig`, `get_preset`.
"""

from __future__ import annotations

from vattention.models.config import ModelConfig, RopeScaling
from vattention.models.llama import LlamaForCausalLM, last_token_indices
from vattention.models.loader import load_model
from vattention.models.presets import PRESETS, get_preset, preset_names
from vattention.models.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "ByteTokenizer",
    "LlamaForCausalLM",
    "ModelConfig",
    "RopeScaling",
    "get_preset",
    "last_token_indices",
    "load_model",
    "load_tokenizer",
    "preset_names",
]
