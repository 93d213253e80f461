"""Tiny random Hugging Face checkpoints for end-to-end tests of `LLM` (CPU, fp32)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

TINY = dict(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def save_tiny(kind: str, directory: Path, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Build a randomized tiny HF model of `kind`, save it (safetensors), return it."""
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides})).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    model.save_pretrained(directory)
    return model


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """HF `generate`, greedy, exactly `new_tokens` tokens (no EOS stop)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def prompts(
    n: int, seed: int = 1, low: int = 3, high: int = 40, vocab: int = 128
) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=gen).tolist()
    return [torch.randint(1, vocab, (k,), generator=gen).tolist() for k in lengths]
