"""Qwen3 (dense): config parsing, and a tiny random HF Qwen3 (explicit head_dim != hidden / heads,
random q/k norm weights, tied embeddings) loaded through our path gives HF's logits and greedy
tokens, on the torch path and on the fused-kernel path (CPU: Triton interpreter)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import (
    build_hf,
    check_chunked_prefill_and_decode,
    hf_logits,
    make_backend,
    run_step,
)

from vattention import LLM, SamplingParams
from vattention.models import ModelConfig, load_model
from vattention.models.rope import RotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from llm_helpers import hf_greedy, prompts  # noqa: E402

PROMPTS = [[5, 17, 3, 44, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [270, 8, 2]]
QWEN3_SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # explicit, != hidden / heads = 16
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
# Qwen3-0.6B's config.json (transformers 4 keys)
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def build_qwen3(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny randomized HF Qwen3ForCausalLM, fp32, eval (q/k norm weights random in [0.5, 1.5))."""
    return build_hf("qwen3", seed, **{**QWEN3_SMALL, **overrides})


def save_qwen3(directory: Path, **overrides: Any) -> torch.nn.Module:
    model = build_qwen3(**overrides)
    model.save_pretrained(directory)
    return model


# ---- config ------------------------------------------------------------------------------------
def test_qwen3_06b_config() -> None:
    c = ModelConfig.from_hf_dict(QWEN3_06B)
    assert (c.model_type, c.qk_norm, c.head_dim, c.q_size, c.kv_size) == (
        "qwen3",
        True,
        128,
        2048,
        1024,
    )
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias)
    assert (c.tie_word_embeddings, c.sliding_window, c.rope_theta) == (True, None, 1e6)
    assert (c.bos_token_id, c.eos_token_ids, c.dtype) == (151643, (151645,), "bfloat16")


def test_qwen3_parameter_count_matches_transformers() -> None:
    import transformers as tf

    hf_dict = {k: v for k, v in QWEN3_06B.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        hf = tf.Qwen3ForCausalLM(tf.Qwen3Config(**hf_dict))
    want = sum(p.numel() for p in hf.parameters())
    assert ModelConfig.from_hf_dict(QWEN3_06B).num_parameters() == want == 596_049_920


def test_qwen3_bias_and_sliding_window() -> None:
    c = ModelConfig.from_hf_dict({**QWEN3_06B, "attention_bias": True, "sliding_window": 4096})
    assert (c.qkv_bias, c.o_bias, c.sliding_window) == (True, True, None)  # HF: bias on q/k/v/o
    on = ModelConfig.from_hf_dict({**QWEN3_06B, "sliding_window": 4096, "use_sliding_window": True})
    assert on.sliding_window == 4096


def test_other_models_have_no_qk_norm() -> None:
    d = {**QWEN3_06B, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    assert not ModelConfig.from_hf_dict(d).qk_norm
    d = {**QWEN3_06B, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert not ModelConfig.from_hf_dict(d).qk_norm


def test_unsupported_qwen_variants_named() -> None:
    moe = {**QWEN3_06B, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}
    with pytest.raises(ValueError, match=r"Qwen3MoeForCausalLM.*supported.*Qwen3ForCausalLM"):
        ModelConfig.from_hf_dict(moe)
    with pytest.raises(ValueError, match=r"model_type 'qwen3_next'.*'qwen3'"):
        ModelConfig.from_hf_dict({**QWEN3_06B, "architectures": [], "model_type": "qwen3_next"})


def test_config_parsed_from_checkpoint(tmp_path: Path) -> None:
    save_qwen3(tmp_path / "m")
    config = ModelConfig.from_pretrained(tmp_path / "m")
    assert (config.model_type, config.qk_norm, config.head_dim, config.tie_word_embeddings) == (
        "qwen3",
        True,
        32,
        True,
    )
    assert config.sliding_window is None
    model = load_model(tmp_path / "m", dtype=torch.float32)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


# ---- numerics ----------------------------------------------------------------------------------
def test_weights_load_by_name(tmp_path: Path) -> None:
    hf = save_qwen3(tmp_path / "m")
    model = load_model(tmp_path / "m", dtype=torch.float32)
    for ours, theirs in zip(model.model.layers, hf.model.layers, strict=True):
        for name in ("q_norm", "k_norm"):
            got = getattr(ours.self_attn, name).weight
            want = getattr(theirs.self_attn, name).weight
            assert got.shape == (32,) and torch.equal(got, want)
            assert not torch.equal(want, torch.ones_like(want))  # the norms' weights matter


def test_prefill_batch_matches_hf(tmp_path: Path) -> None:
    hf = save_qwen3(tmp_path / "m")
    model = load_model(tmp_path / "m", dtype=torch.float32)
    out = run_step(model, make_backend(model), [2, 0, 1], [0, 0, 0], PROMPTS)
    for ids, ours in zip(PROMPTS, out, strict=True):
        ref = hf_logits(hf, ids)
        assert ref.std() > 0.3  # the weights are large enough for the comparison to mean something
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_qk_norm_changes_logits(tmp_path: Path) -> None:
    """Guard: without the q/k norms our model is far from HF (the tests above would notice)."""
    hf = save_qwen3(tmp_path / "m")
    model = load_model(tmp_path / "m", dtype=torch.float32)
    for layer in model.model.layers:
        layer.self_attn.q_norm = None
        layer.self_attn.k_norm = None
    (ours,) = run_step(model, make_backend(model), [0], [0], [PROMPTS[1]])
    assert (ours - hf_logits(hf, PROMPTS[1])).abs().max() > 1e-2


def test_chunked_prefill_and_decode_match_hf(tmp_path: Path) -> None:
    hf = save_qwen3(tmp_path / "m")
    model = load_model(tmp_path / "m", dtype=torch.float32)
    check_chunked_prefill_and_decode(hf, model, PROMPTS[1], PROMPTS[0] + [33, 21])


def test_fused_kernel_path_matches_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path (q/k normed into a new qkv tensor, then the Triton `rope_qkv`; fused
    residual-add + RMSNorm and SiLU-and-mul), forced on the CPU under the Triton interpreter
    (on a CUDA machine the interpreter is off: `test_llm_greedy_matches_hf_on_cuda` runs it)."""
    if torch.cuda.is_available():
        pytest.skip("the Triton interpreter runs only where no CUDA device exists")
    hf = save_qwen3(tmp_path / "m")
    model = load_model(tmp_path / "m", dtype=torch.float32)
    rotary = model.model.rotary_emb
    fused_calls = []

    def fused_inputs(positions: torch.Tensor, dtype: torch.dtype, fused: bool) -> Any:
        fused_calls.append(True)
        return RotaryEmbedding.inputs(rotary, positions, dtype, fused=True)

    monkeypatch.setattr(rotary, "inputs", fused_inputs)
    backend = make_backend(model)
    out = run_step(model, backend, [2, 0], [0, 0], [PROMPTS[0], PROMPTS[1]])
    for ids, ours in zip(PROMPTS[:2], out, strict=True):
        torch.testing.assert_close(ours, hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    a = PROMPTS[0] + [7]  # a decode step through the cache
    (ours,) = run_step(model, backend, [2], [len(PROMPTS[0])], [[7]])
    torch.testing.assert_close(ours, hf_logits(hf, a)[-1:], atol=1e-4, rtol=1e-4)
    assert fused_calls


def _llm_greedy_matches_hf(path: Path, num_prompts: int, **opts: Any) -> None:
    """`LLM(path, **opts)` loads a saved tiny Qwen3; its greedy tokens equal HF `generate`'s."""
    hf = save_qwen3(path)
    batch = prompts(num_prompts, vocab=300)
    new = 12
    want = [hf_greedy(hf, p, new) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    with LLM(str(path), dtype="float32", max_model_len=128, max_num_seqs=4,
             max_num_batched_tokens=32, block_size=16, **opts) as llm:  # type: ignore[arg-type]  # fmt: skip
        outs = llm.generate(batch, params, use_tqdm=False)  # chunked prefill next to decodes
    assert [o.token_ids for o in outs] == want


def test_llm_greedy_matches_hf(tmp_path: Path) -> None:
    """End to end: `LLM(path)` loads the checkpoint and its greedy tokens equal HF `generate`."""
    _llm_greedy_matches_hf(tmp_path / "m", 4, device="cpu", kv_page_size=64 * 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_llm_greedy_matches_hf_on_cuda(tmp_path: Path, kv_cache: str) -> None:
    """On CUDA (fused RoPE after the q/k norms, fused add + RMSNorm, CUDA graphs of decode and
    mixed steps), greedy tokens equal HF `generate` on the CPU, on both caches."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _llm_greedy_matches_hf(
        tmp_path / "m", 6, kv_cache=kv_cache, device="cuda", kv_cache_memory=256 << 20
    )
