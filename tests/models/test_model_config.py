"""ModelConfig parsing (HF config dicts of each family), validation, presets and sizes."""

from __future__ import annotations

import pytest
import torch

from vattention.models import PRESETS, ModelConfig, RopeScaling, get_preset
from vattention.models.rope import inverse_frequencies

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_llama2_style_config() -> None:
    c = ModelConfig.from_hf_dict(BASE)
    assert (c.head_dim, c.num_kv_heads, c.rope_theta, c.rope_scaling) == (128, 32, 10000.0, None)
    assert (c.dtype, c.bos_token_id, c.eos_token_ids) == ("float16", 1, (2,))
    assert c.torch_dtype == torch.float16
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias or c.tie_word_embeddings)
    # Llama-2-7B has 6.74B parameters
    assert c.num_parameters() == 6_738_415_616


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_llama31_rope_scaling(key: str, type_key: str) -> None:
    rope = {
        type_key: "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if key == "rope_scaling":  # transformers 4: theta beside the scaling
        d = {**BASE, key: rope, "rope_theta": 500000.0}
    else:  # transformers 5: theta inside rope_parameters
        d = {**BASE, key: {**rope, "rope_theta": 500000.0}}
    d["eos_token_id"] = [128001, 128008, 128009]
    c = ModelConfig.from_hf_dict(d)
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert c.rope_theta == 500000.0
    assert c.eos_token_ids == (128001, 128008, 128009)


def test_llama3_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = inverse_frequencies(128, 500000.0, RopeScaling.from_hf(rope))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["dynamic", "yarn", "longrope"])
def test_unsupported_rope_scaling(kind: str) -> None:
    with pytest.raises(ValueError, match=f"unsupported rope scaling type '{kind}'"):
        ModelConfig.from_hf_dict({**BASE, "rope_scaling": {"rope_type": kind, "factor": 2.0}})


def test_mistral_sliding_window() -> None:
    d = {**BASE, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert ModelConfig.from_hf_dict({**d, "sliding_window": 1024}).sliding_window == 1024
    assert ModelConfig.from_hf_dict({**d, "sliding_window": None}).sliding_window is None
    # a window covering every position is no window
    assert ModelConfig.from_hf_dict({**d, "sliding_window": 4096}).sliding_window is None


def test_qwen2_bias_tied_and_unused_window() -> None:
    d = {
        **BASE,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "tie_word_embeddings": True,
        "sliding_window": 1024,
        "use_sliding_window": False,
    }
    c = ModelConfig.from_hf_dict(d)
    assert (c.qkv_bias, c.o_bias, c.tie_word_embeddings, c.sliding_window) == (
        True,
        False,
        True,
        None,
    )
    assert ModelConfig.from_hf_dict({**d, "use_sliding_window": True}).sliding_window == 1024


def test_unknown_architecture_named() -> None:
    d = {**BASE, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        ModelConfig.from_hf_dict(d)
    with pytest.raises(ValueError, match="model_type 'falcon'"):
        ModelConfig.from_hf_dict({**BASE, "architectures": [], "model_type": "falcon"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_hidden_layers": 0}, "num_layers"),
    ],
)
def test_invalid_configs(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**BASE, **change})


def test_missing_key_named() -> None:
    d = dict(BASE)
    del d["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_hf_dict(d)


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("name", "billions"), [("yi-6b", 6.06), ("llama-3-8b", 8.03), ("yi-34b", 34.39)]
)
def test_preset_parameter_counts(name: str, billions: float) -> None:
    assert get_preset(name).num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)


def test_preset_shapes() -> None:
    llama = get_preset("LLaMA-3-8B")
    assert (llama.hidden_size, llama.num_layers, llama.num_heads, llama.num_kv_heads) == (
        4096,
        32,
        32,
        8,
    )
    assert (llama.intermediate_size, llama.vocab_size, llama.rope_theta) == (14336, 128256, 5e5)
    yi = get_preset("yi-34b")
    assert (yi.hidden_size, yi.num_layers, yi.num_heads, yi.num_kv_heads, yi.head_dim) == (
        7168,
        60,
        56,
        8,
        128,
    )
    assert set(PRESETS) >= {"tiny", "yi-6b", "llama-3-8b", "yi-34b"}
    with pytest.raises(ValueError, match="unknown model preset 'gpt-5'"):
        get_preset("gpt-5")


def test_kv_cache_spec() -> None:
    spec = get_preset("llama-3-8b").kv_cache_spec(max_slots=8, max_seq_len=1024)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (
        32,
        8,
        128,
        torch.bfloat16,
    )
    assert spec.token_bytes == 128 * 1024  # 128 KiB of K+V per token for Llama-3-8B in bf16
