"""Helpers for the model tests: tiny random HF models and a plain-tensor attention backend.

`PlainCacheBackend` keeps K/V in one ordinary tensor `[layers, slots, max_len, kv_heads, dim]`
and attends request by request with a causal (bottom-right aligned) mask: enough to run prefill
chunks and decode steps through our model and compare with Hugging Face on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vattention.attention.base import AttentionBackend, AttentionMetadata
from vattention.models import LlamaForCausalLM


class PlainCache:
    def __init__(self, layers: int, slots: int, max_len: int, heads: int, dim: int, **kw: Any):
        self.k = torch.zeros(layers, slots, max_len, heads, dim, **kw)
        self.v = torch.zeros_like(self.k)

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.v[layer]


class PlainCacheBackend(AttentionBackend):
    name = "test_plain"

    def write_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        idx = (meta.token_slots, meta.token_positions)
        self.cache.k_cache(layer).index_put_(idx, k)
        self.cache.v_cache(layer).index_put_(idx, v)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        group = self.num_heads // self.num_kv_heads
        out = []
        start = 0
        for slot, n_q, n_k in zip(
            meta.slots_host, meta.query_lens_host, meta.seq_lens_host, strict=True
        ):
            k = self.cache.k_cache(layer)[slot, :n_k].repeat_interleave(group, dim=1)
            v = self.cache.v_cache(layer)[slot, :n_k].repeat_interleave(group, dim=1)
            qi = q[start : start + n_q].transpose(0, 1)  # [H, n_q, D]
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
            o = F.scaled_dot_product_attention(
                qi, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=self.scale
            )
            out.append(o.transpose(0, 1))
            start += n_q
        return torch.cat(out)


def make_backend(model: LlamaForCausalLM, slots: int = 4, max_len: int = 64) -> PlainCacheBackend:
    c = model.config
    w = model.head_weight()
    cache = PlainCache(
        c.num_layers, slots, max_len, c.num_kv_heads, c.head_dim, dtype=w.dtype, device=w.device
    )
    return PlainCacheBackend(cache, c.num_heads, c.num_kv_heads, c.head_dim)


@torch.no_grad()
def run_step(
    model: LlamaForCausalLM,
    backend: AttentionBackend,
    slots: Sequence[int],
    context_lens: Sequence[int],
    chunks: Sequence[Sequence[int]],
) -> list[torch.Tensor]:
    """One mixed step: request i appends `chunks[i]`; returns each request's logits `[n_i, V]`."""
    device = model.head_weight().device
    meta = AttentionMetadata.build(slots, context_lens, [len(c) for c in chunks], device=device)
    ids = torch.tensor([t for c in chunks for t in c], device=device)
    hidden = model(ids, meta.token_positions, meta, backend)
    logits = model.compute_logits(hidden)
    return list(logits.split([len(c) for c in chunks]))


@torch.no_grad()
def randomize_(hf_model: torch.nn.Module, seed: int = 0) -> None:
    """Weights big enough that logits are O(1) (HF's default init makes them near zero)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in hf_model.named_parameters():
        if "norm" in name:
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        elif p.dim() == 1:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def build_hf(kind: str, **overrides: Any) -> torch.nn.Module:
    """A tiny randomized HF causal LM of `kind` in {"llama", "mistral", "qwen2"}, fp32, eval."""
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    config = config_cls(**{**SMALL, **overrides})
    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    randomize_(model)
    return model
