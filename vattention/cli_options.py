"""Command-line options that mirror `EngineConfig`, one `--kebab-case` flag per field.

Every field of `EngineConfig` (except `model`, a positional argument) becomes a flag with its
type, default and help text, so `vattention serve --help` documents every engine option and a
new field cannot be forgotten (a test checks that every field has a help text here).
`engine_config(args)` builds the frozen, validated `EngineConfig` back from parsed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

HELP: dict[str, str] = {
    "kv_cache": "KV cache: 'vattention' (contiguous virtual memory) or 'paged' (block tables)",
    "dtype": "weights and KV dtype (float32, bfloat16, float16); default: the checkpoint's",
    "device": "cuda or cpu; default: cuda when available",
    "load_format": "auto/safetensors (read the weights) or dummy (random weights, presets)",
    "seed": "seed of random weights and of unseeded sampling",
    "max_num_seqs": "most requests running at once (KV slots)",
    "max_num_batched_tokens": "token budget of one step (decodes plus prefill chunks)",
    "max_model_len": "most tokens (prompt + output) of one request; default: the model's",
    "gpu_memory_utilization": "share of total device memory for weights, activations, graphs and KV",
    "kv_cache_memory": "KV cache budget in bytes (overrides --gpu-memory-utilization)",
    "attention_backend": "attention backend name; default auto (vattention) / pa_triton (paged)",
    "attention_options": "JSON object of the attention backend's options, e.g. "
    "'{\"cudnn_min_tokens\": 8192}' for auto",
    "block_size": "tokens per block of the paged cache",
    "kv_layout": "vattention layout: cross_layer_kv (default: K and V of all layers in one "
    "page), cross_layer (K and V pages apart: twice the tokens a page) or per_layer",
    "kv_page_size": "physical page size in bytes (default: the backend's, 2 MiB on CUDA)",
    "enforce_eager": "no CUDA graphs",
    "mixed_graph_tokens": "CUDA graphs for mixed steps below this many new tokens (0: off)",
    "max_graph_prefills": "most prefilling requests in a step run as a CUDA graph",
    "async_scheduling": "schedule and launch step i+1 before step i's tokens are read",
    "kv_preallocate": "create the whole KV page budget at start-up (default: on CUDA)",
    "kv_mapping": "where pages are mapped: inline (after each launch) or thread",
    "kv_lookahead_tokens": "tokens mapped ahead of each request beyond the next step's need",
    "enable_prefix_caching": "share the KV pages of common prompt prefixes (default: on wherever "
    "the cache can share pages; false turns it off, true makes it required)",
    "kv_segment_min_pages": "copy a shared prefix of at least this many pages, once two "
    "requests map it, into one allocation mapped in one call (0: never; default 4)",
    "cascade_attention": "decode steps attend a prefix that requests share (mapped pages of "
    "one system prompt) once for all of them (Triton decode kernel; on by default)",
    "tokenizer": "tokenizer directory, if not the model's",
    "chat_template": "a Jinja chat template, or a file holding one, to use instead of the "
    "tokenizer's",
    "generation_config": "sampling defaults for what a request leaves unset: auto (the model's "
    "generation_config.json), none, or a directory or file holding one",
    "scheduling_policy": "fcfs, or priority (requests' priority field, lower first, may preempt)",
}


def _base_type(name: str) -> type:
    """The type of field `name` without `None` (`int | None` -> int)."""
    hint = typing.get_type_hints(_config_class())[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint  # type: ignore[no-any-return]


def _config_class() -> Any:
    from vattention.engine.llm_engine import EngineConfig

    return EngineConfig


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `EngineConfig` field (but `model`) to `parser`."""
    group = parser.add_argument_group("engine options (EngineConfig)")
    for f in dataclasses.fields(_config_class()):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(f.name)
        default = f.default
        help_text = HELP.get(f.name, f.name)
        shown = "" if default is None else f" (default: {default})"
        if typing.get_origin(kind) is dict:
            group.add_argument(flag, type=_json_object, default=None, metavar="JSON",
                               help=help_text)  # fmt: skip
        elif kind is bool and default is False:
            group.add_argument(flag, action="store_true", default=None, help=help_text)
        elif kind is bool:
            group.add_argument(flag, type=_bool, default=None, metavar="{true,false}",
                               help=f"{help_text}{shown}")  # fmt: skip
        else:
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"{help_text}{shown}")  # fmt: skip


def engine_config(model: str, args: argparse.Namespace, **overrides: Any) -> Any:
    """The `EngineConfig` of parsed arguments: flags left unset keep the dataclass default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(_config_class()):
        if f.name == "model":
            continue
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _config_class()(model=model, **values)
