"""`ModelConfig`: the shape of a Llama-family model, parsed from a Hugging Face `config.json`.

One frozen dataclass serves Llama 2, Llama 3/3.1, Mistral, Qwen2, Qwen3 (dense) and Yi (Llama
architecture). Qwen3 differs only in `qk_norm`: a per-head RMSNorm of q and k (weights
`self_attn.q_norm`/`k_norm`, `[head_dim]`) after the projections and before RoPE; its `head_dim` is
explicit (often not hidden / heads), its attention biases (off by default) follow Llama's
`attention_bias` (q, k, v and o) and, like Qwen2, its `sliding_window` counts only with
`use_sliding_window`.
Invariants (checked in `__post_init__`): every size is positive; `num_heads` is a multiple of
`num_kv_heads`; `rope_scaling` is None or a supported `RopeScaling`; `sliding_window` is None or
smaller than `max_position_embeddings` (a window that covers every position is no window).
Parsing reads both the transformers 4 keys (`rope_theta`, `rope_scaling`, `torch_dtype`) and the
transformers 5 ones (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from vattention.kvcache.spec import KVCacheSpec, parse_dtype

# architecture name in `architectures` -> `model_type`; all share one implementation.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# model types whose attention normalizes q and k per head (RMSNorm over head_dim) before RoPE
QK_NORM_MODEL_TYPES = ("qwen3",)
SUPPORTED_MODEL_TYPES = tuple(sorted(set(SUPPORTED_ARCHITECTURES.values())))
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (positions / factor) or `llama3` (per-band rescale)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        """Parse HF `rope_scaling`/`rope_parameters` (key `rope_type` or legacy `type`)."""
        if not d:
            return None
        kind = d.get("rope_type", d.get("type", "default"))
        if kind in (None, "default"):
            return None
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling type {kind!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
            )
        if "factor" not in d:
            raise ValueError(f"rope scaling {kind!r} needs a 'factor', got {d}")
        if kind == "linear":
            return cls("linear", float(d["factor"]))
        missing = [
            k
            for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if k not in d
        ]
        if missing:
            raise ValueError(f"llama3 rope scaling misses {missing}: {d}")
        return cls(
            "llama3",
            float(d["factor"]),
            float(d["low_freq_factor"]),
            float(d["high_freq_factor"]),
            int(d["original_max_position_embeddings"]),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only Llama-family model (see module docstring)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm (eps rms_norm_eps) of each q/k head before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    dtype: str = "bfloat16"  # the checkpoint's dtype: the default when loading
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "int":
                value = getattr(self, f.name)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ValueError(f"ModelConfig.{f.name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        sw = self.sliding_window
        if sw is not None and sw >= self.max_position_embeddings:
            object.__setattr__(self, "sliding_window", None)

    # ---- parsing -------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "") -> ModelConfig:
        """Build from the dict of a HF `config.json` (clear errors for unsupported models)."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type") or (
            SUPPORTED_ARCHITECTURES.get(archs[0]) if archs else None
        )
        unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if unknown or model_type not in SUPPORTED_MODEL_TYPES:
            what = f"architectures {archs}" if unknown else f"model_type {model_type!r}"
            raise ValueError(
                f"unsupported model {name or ''} ({what}); supported architectures: "
                f"{sorted(SUPPORTED_ARCHITECTURES)} (model_type {list(SUPPORTED_MODEL_TYPES)})"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' is implemented")
        rope_params = d.get("rope_parameters") or {}
        rope_scaling = RopeScaling.from_hf(d.get("rope_scaling") or rope_params)
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        sliding = d.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
            sliding = None
        eos = d.get("eos_token_id")
        eos_ids = (
            tuple(int(e) for e in eos)
            if isinstance(eos, list)
            else (() if eos is None else (int(eos),))
        )
        dtype = d.get("torch_dtype") or d.get("dtype") or "bfloat16"
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=d.get("num_key_value_heads") or num_heads,
                head_dim=head_dim,
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                qkv_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
                o_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                qk_norm=model_type in QK_NORM_MODEL_TYPES,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                sliding_window=sliding,
                model_type=model_type,
                dtype=str(dtype).replace("torch.", ""),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                name=name,
            )
        except KeyError as e:
            raise ValueError(f"config {name or ''} lacks the key {e.args[0]!r}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `<path>/config.json` (path: a local model directory)."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in model directory {str(path)!r}")
        with open(file) as fh:
            return cls.from_hf_dict(json.load(fh), name=str(path))

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes (nothing allocated)."""
        h, inter = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * inter + (2 * inter + h) * self.mlp_bias
        layer = attn + mlp + 2 * h + 2 * self.head_dim * self.qk_norm
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + embed + head + h

    def kv_cache_spec(
        self,
        max_slots: int,
        max_seq_len: int,
        dtype: torch.dtype | str | None = None,
        layout: str = "cross_layer",
        page_size: int | None = None,
    ) -> KVCacheSpec:
        """The `KVCacheSpec` this model needs for `max_slots` requests of `max_seq_len` tokens."""
        return KVCacheSpec(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_slots=max_slots,
            max_seq_len=max_seq_len,
            dtype=parse_dtype(dtype if dtype is not None else self.dtype),
            page_size=page_size,
            layout=layout,
        )
