"""Sampling defaults from a model's `generation_config.json` (vLLM's `--generation-config auto`).

Model authors record the sampling they recommend there (Llama 3: temperature 0.6, top_p 0.9;
Qwen3: temperature 0.6, top_p 0.95, top_k 20). The engine uses those values wherever a request
leaves a parameter unset: `LLM.generate(prompts)` without sampling params, and server requests
that omit `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty` or the token limit.

Only keys present in the file count (not Hugging Face's own defaults), mapped to
`SamplingParams` names: `max_new_tokens` -> `max_tokens`; `top_k` 0 (off in HF) -> -1.
`do_sample` is not read (as vLLM): a recorded temperature applies. A file that is not valid JSON
or values of the wrong type are a clear ValueError, raised at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "generation_config.json"
# generation_config.json key -> (SamplingParams field, type)
FIELDS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "max_new_tokens": ("max_tokens", int),
}


def sampling_defaults(source: str | Path) -> dict[str, Any]:
    """The `SamplingParams` defaults of `source` (a model directory or the file itself); {} if
    there is no such file."""
    path = Path(source)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"generation config {path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"generation config {path}: expected a JSON object")
    out: dict[str, Any] = {}
    for key, (name, kind) in FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"generation config {path}: {key} must be a number, got {value!r}")
        if kind is int and value != int(value):
            raise ValueError(f"generation config {path}: {key} must be an integer, got {value}")
        out[name] = kind(value)
    if out.get("top_k") == 0:
        out["top_k"] = -1
    return out
