"""Built-in model configs (real shapes of public checkpoints, plus two tiny ones for tests).

Presets carry no weights and no tokenizer: load them with `load_format="dummy"` (random weights)
for benchmarks, and use `ByteTokenizer` (see `tokenizer.py`) where text is needed. Shapes are those
of the published `config.json` files.
"""

from __future__ import annotations

from vattention.models.config import ModelConfig, RopeScaling

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="tiny",
    ),
    # For GPU tests and the sanitizer: tiny compute, but wide K/V (32 KiB of K and V per token
    # in bf16), so a 2 MiB page holds 64 tokens and short prompts span pages (prefix sharing,
    # segments, page crossings) without an 8B model's run time.
    "tiny-wide": ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_layers=2,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="tiny-wide",
    ),
    "yi-6b": ModelConfig(
        vocab_size=64000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        max_position_embeddings=4096,
        rope_theta=5_000_000.0,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="yi-6b",
    ),
    "llama-3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        bos_token_id=128000,
        eos_token_ids=(128001,),
        name="llama-3-8b",
    ),
    # Long-context checkpoints the vAttention paper evaluates or users run (128K / 200K tokens).
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=500_000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        name="llama-3.1-8b",
    ),
    "yi-6b-200k": ModelConfig(
        vocab_size=64000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        max_position_embeddings=200_000,
        rope_theta=5_000_000.0,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="yi-6b-200k",
    ),
    "yi-34b": ModelConfig(
        vocab_size=64000,
        hidden_size=7168,
        intermediate_size=20480,
        num_layers=60,
        num_heads=56,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
        rope_theta=5_000_000.0,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="yi-34b",
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The preset config called `name` (case-insensitive); ValueError naming the known ones."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {preset_names()}") from None
