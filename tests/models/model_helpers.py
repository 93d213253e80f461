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


def build_hf(kind: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny randomized HF causal LM of `kind` in {"llama", "mistral", "qwen2", "qwen3"},
    fp32, eval."""
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    config = config_cls(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    randomize_(model, seed)
    return model


@torch.no_grad()
def hf_logits(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """HF's uncached logits of one prompt, `[len(ids), vocab]` float32."""
    return hf_model(input_ids=torch.tensor([ids])).logits[0].float()


def check_chunked_prefill_and_decode(
    hf_model: torch.nn.Module, model: LlamaForCausalLM, a: list[int], b: list[int]
) -> None:
    """Prefill in chunks and decode one token at a time, mixed in one batch, through the
    cache: every step's logits equal HF's uncached ones (`a`: at least 12 tokens)."""
    backend = make_backend(model)
    ref_a, ref_b = hf_logits(hf_model, a), hf_logits(hf_model, b)
    # step 1: a's first chunk (6 tokens), b's whole prompt but its last token
    out = run_step(model, backend, [3, 1], [0, 0], [a[:6], b[:-1]])
    torch.testing.assert_close(out[0], ref_a[:6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref_b[:-1], atol=1e-4, rtol=1e-4)
    # step 2: a's second chunk (5 tokens) next to b's decode token
    out = run_step(model, backend, [3, 1], [6, len(b) - 1], [a[6:11], b[-1:]])
    torch.testing.assert_close(out[0], ref_a[6:11], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref_b[-1:], atol=1e-4, rtol=1e-4)
    # then a decodes its remaining tokens one by one
    for pos in range(11, len(a)):
        (ours,) = run_step(model, backend, [3], [pos], [a[pos : pos + 1]])
        torch.testing.assert_close(ours, ref_a[pos : pos + 1], atol=1e-4, rtol=1e-4)
