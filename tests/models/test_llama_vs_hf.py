"""Our LlamaForCausalLM, loaded from HF checkpoints, gives Hugging Face's logits (CPU, fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import check_chunked_prefill_and_decode, hf_logits, make_backend, run_step

from vattention.models import ModelConfig, load_model

PROMPTS = [[5, 17, 3, 44, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [70, 8, 2]]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES = {
    "llama": ("llama", {}),
    "llama-bias-tied": (
        "llama",
        {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    ),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "head_dim": 32}),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral": ("mistral", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_batch_matches_hf(hf_checkpoint, case: str) -> None:
    kind, overrides = CASES[case]
    hf_model, path = hf_checkpoint(kind, **overrides)
    model = load_model(path, dtype=torch.float32)
    assert model.config.model_type == kind
    out = run_step(model, make_backend(model), [2, 0, 1], [0, 0, 0], PROMPTS)
    for ids, ours in zip(PROMPTS, out, strict=True):
        ref = hf_logits(hf_model, ids)
        assert ref.std() > 0.3  # the weights are large enough for the comparison to mean something
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_llama3_rope_changes_logits(hf_checkpoint) -> None:
    """Guard: the llama3 scaling case would fail if the scaling were ignored."""
    hf_model, path = hf_checkpoint("llama", rope_scaling=LLAMA3_ROPE, head_dim=32)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    model = load_model(path, dtype=torch.float32)
    assert model.config.rope_scaling is None
    (ours,) = run_step(model, make_backend(model), [0], [0], [PROMPTS[1]])
    assert (ours - hf_logits(hf_model, PROMPTS[1])).abs().max() > 1e-2


def test_sharded_checkpoint(hf_checkpoint) -> None:
    hf_model, path = hf_checkpoint("llama", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = load_model(path, dtype=torch.float32)
    (ours,) = run_step(model, make_backend(model), [0], [0], [PROMPTS[0]])
    torch.testing.assert_close(ours, hf_logits(hf_model, PROMPTS[0]), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_decode_match_hf(hf_checkpoint) -> None:
    """Prefill in chunks and decode one token at a time, mixed in one batch, through the cache."""
    hf_model, path = hf_checkpoint("qwen2")
    model = load_model(path, dtype=torch.float32)
    check_chunked_prefill_and_decode(hf_model, model, PROMPTS[1], PROMPTS[0] + [33, 21])


def test_bf16_load_is_close_to_fp32(hf_checkpoint) -> None:
    _, path = hf_checkpoint("llama")
    ref = load_model(path, dtype=torch.float32)
    half = load_model(path, dtype="bf16")
    assert half.head_weight().dtype == torch.bfloat16
    (out32,) = run_step(ref, make_backend(ref), [0], [0], [PROMPTS[1]])
    (out16,) = run_step(half, make_backend(half), [0], [0], [PROMPTS[1]])
    assert out16.dtype == torch.float32  # logits are float32 whatever the model dtype
    assert (out16 - out32).abs().max() < 0.15 * out32.abs().max()


def test_config_parsed_from_checkpoint(hf_checkpoint) -> None:
    _, path = hf_checkpoint("mistral", sliding_window=64)
    config = ModelConfig.from_pretrained(path)
    assert (config.model_type, config.sliding_window, config.head_dim) == ("mistral", 64, 16)
    assert config.num_parameters() == sum(
        p.numel() for p in load_model(path, dtype=torch.float32).parameters()
    )


def registered_backends() -> list[str]:
    try:
        from vattention.attention import backend_names
    except ImportError:  # the attention package is not there (yet)
        return []
    return [n for n in ("torch_sdpa_ref", "sdpa", "auto") if n in backend_names()]


@pytest.mark.parametrize("layout", ["cross_layer", "cross_layer_kv", "per_layer"])
@pytest.mark.parametrize("backend_name", registered_backends())
def test_virtual_cache_and_real_backends(hf_checkpoint, backend_name: str, layout: str) -> None:
    """End to end on the CPU: VirtualKVCache slots + a registered backend + our model = HF."""
    from vattention.attention import create_backend
    from vattention.kvcache.virtual import VirtualKVCache

    hf_model, path = hf_checkpoint("llama", rope_scaling=LLAMA3_ROPE)
    model = load_model(path, dtype=torch.float32)
    c = model.config
    spec = c.kv_cache_spec(max_slots=4, max_seq_len=64, dtype=torch.float32, layout=layout)
    with VirtualKVCache(spec, "cpu", budget_bytes=2**24) as cache:
        backend = create_backend(backend_name, cache, c.num_heads, c.num_kv_heads, c.head_dim)
        a, b = PROMPTS[1], PROMPTS[0]
        sa, sb = cache.alloc_slot(), cache.alloc_slot()
        cache.step({sa: 7, sb: len(b)})
        out = run_step(model, backend, [sa, sb], [0, 0], [a[:7], b])
        torch.testing.assert_close(out[1], hf_logits(hf_model, b), atol=1e-4, rtol=1e-4)
        cache.step({sa: len(a)})
        (rest,) = run_step(model, backend, [sa], [7], [a[7:]])
        ref = hf_logits(hf_model, a)
        torch.testing.assert_close(torch.cat([out[0], rest]), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_on_gpu_with_auto_backend(hf_checkpoint, kind: str) -> None:
    """bf16 on CUDA through VirtualKVCache + `auto` stays close to HF's fp32 logits."""
    from vattention.attention import create_backend
    from vattention.kvcache.virtual import VirtualKVCache

    hf_model, path = hf_checkpoint(kind, hidden_size=256, head_dim=64)
    hf_model.cuda()
    model = load_model(path, dtype=torch.bfloat16, device="cuda")
    c = model.config
    spec = c.kv_cache_spec(max_slots=4, max_seq_len=256, dtype=torch.bfloat16)
    with VirtualKVCache(spec, "cuda", budget_bytes=2**28) as cache:
        backend = create_backend("auto", cache, c.num_heads, c.num_kv_heads, c.head_dim)
        a, b = PROMPTS[1], PROMPTS[2]
        sa, sb = cache.alloc_slot(), cache.alloc_slot()
        cache.step({sa: len(a) - 1, sb: len(b) - 1})
        run_step(model, backend, [sa, sb], [0, 0], [a[:-1], b[:-1]])
        cache.step({sa: len(a), sb: len(b)})
        out = run_step(model, backend, [sa, sb], [len(a) - 1, len(b) - 1], [a[-1:], b[-1:]])
    with torch.no_grad():
        for ids, ours in zip((a, b), out, strict=True):
            ref = hf_model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1:].float()
            assert ((ours - ref).norm() / ref.norm()).item() < 0.05
