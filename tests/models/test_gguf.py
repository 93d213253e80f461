"""GGUF -> HF-style directory: tiny GGUFs written here as llama.cpp writes them (Q/K rows permuted
for `llama`), converted by `vattention.models.gguf`, give the original model's logits; metadata
maps to config.json; errors name the problem; the converted directory is cached."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_helpers import build_hf, hf_logits, make_backend, run_step
from safetensors import safe_open

from vattention import LLM, SamplingParams
from vattention.models import ModelConfig, load_model, resolve_model
from vattention.models import gguf as vgguf

gguf = pytest.importorskip("gguf")

PROMPTS = [[5, 17, 3, 44, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [70, 8, 2]]
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.<weight|bias>
    return f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_rope_factors(head_dim: int, theta: float, factor: float, old: int) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for Llama 3.1 scaling (low 1, high 4)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / 4:
            out.append(1.0)
        elif wavelen > old:
            out.append(factor)
        else:
            smooth = (old / wavelen - 1) / 3
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(
    model: torch.nn.Module,
    path: Path,
    qtype: str = "F32",
    arch: str | None = None,
    drop: Iterable[str] = (),
    extra_tensors: dict[str, np.ndarray] | None = None,
    meta: Callable[[Any], None] | None = None,
) -> Path:
    """Write `model` as llama.cpp would: metadata, Q/K permuted (llama), 2-D weights in `qtype`."""
    c = model.config
    kind = c.model_type
    arch = arch or ("qwen2" if kind == "qwen2" else "llama")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(
        c, "rope_theta", 10000.0
    )
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if meta is not None:
        meta(w)
    quant = gguf.GGMLQuantizationType[qtype]
    tied = c.tie_word_embeddings
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name = gguf_name(hf_name)
        if name in drop:
            continue
        arr = t.detach().float().numpy().copy()
        if arch == "llama" and ".attn_q." in name:
            arr = llamacpp_permute(arr, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            arr = llamacpp_permute(arr, c.num_key_value_heads)
        if arr.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, arr)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_dir(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def assert_logits_match(path: Path, hf_model: torch.nn.Module) -> None:
    model = load_model(path, dtype=torch.float32)
    out = run_step(model, make_backend(model), [2, 0, 1], [0, 0, 0], PROMPTS)
    for ids, ours in zip(PROMPTS, out, strict=True):
        ref = hf_logits(hf_model, ids)
        assert ref.std() > 0.3
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test converts into its own cache (never the user's)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("VATTENTION_CACHE_DIR", str(root))
    return root


CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_f32_gguf_converts_exactly(tmp_path: Path, case: str) -> None:
    kind, overrides = CASES[case]
    hf = build_hf(kind, **overrides)
    file = write_gguf(hf, tmp_path / "m.gguf")
    out = vgguf.convert_gguf(file, tmp_path / "out")
    got = read_dir(out)
    want = {
        k: v
        for k, v in hf.state_dict().items()
        if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)
    }
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name  # bit-exact, Q/K un-permuted
    assert_logits_match(out, hf)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == hf.config.tie_word_embeddings
    assert ModelConfig.from_pretrained(out).model_type == ("qwen2" if kind == "qwen2" else "llama")


def test_converted_directory_loads_in_transformers(tmp_path: Path) -> None:
    """The directory is a real HF checkpoint: transformers gives the original logits from it."""
    from transformers import AutoModelForCausalLM

    hf = build_hf("llama")
    out = vgguf.convert_gguf(write_gguf(hf, tmp_path / "m.gguf"), tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    for ids in PROMPTS:
        torch.testing.assert_close(hf_logits(again, ids), hf_logits(hf, ids))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_q8_0_equals_the_dequantized_model(tmp_path: Path, kind: str) -> None:
    hf = build_hf(kind, intermediate_size=128)  # Q8_0 blocks: rows of a multiple of 32
    out = vgguf.convert_gguf(write_gguf(hf, tmp_path / "m.gguf", "Q8_0"), tmp_path / "out")
    ref = build_hf(kind, intermediate_size=128)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:  # Q8_0 blocks run along rows, so they commute with the permutation
                deq = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)
                p.copy_(torch.from_numpy(deq))
    got = read_dir(out)
    for name, t in ref.state_dict().items():
        assert torch.equal(got[name], t), name
    assert not torch.equal(
        got["model.layers.0.mlp.up_proj.weight"], hf.model.layers[0].mlp.up_proj.weight
    )
    assert_logits_match(out, ref)


def test_llm_generates_from_a_gguf_file_like_hf(tmp_path: Path, cache_dir: Path) -> None:
    hf = build_hf("llama")
    file = write_gguf(hf, tmp_path / "tiny.gguf")
    want = []
    for p in PROMPTS:  # uncached greedy reference
        ids = list(p)
        for _ in range(12):
            ids.append(int(hf_logits(hf, ids)[-1].argmax()))
        want.append(ids[len(p) :])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(str(file), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=2) as llm:
        assert Path(llm.engine.model_path).parent == cache_dir / "gguf"
        assert llm.tokenizer is None  # no tokenizer metadata; vocab too small for bytes
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == want


def test_bfloat16_storage(tmp_path: Path) -> None:
    hf = build_hf("llama")
    out = vgguf.convert_gguf(write_gguf(hf, tmp_path / "m.gguf"), tmp_path / "out", "bfloat16")
    got = read_dir(out)
    assert got["model.norm.weight"].dtype == torch.bfloat16
    assert ModelConfig.from_pretrained(out).dtype == "bfloat16"
    torch.testing.assert_close(
        got["model.layers.1.self_attn.k_proj.weight"].float(),
        hf.model.layers[1].self_attn.k_proj.weight,
        atol=0.02,
        rtol=0.01,
    )


# ---- metadata -> config ------------------------------------------------------------------------
def test_metadata_maps_to_config(tmp_path: Path) -> None:
    hf = build_hf("llama", tie_word_embeddings=True, rms_norm_eps=1e-6)

    def meta(w: Any) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        w.add_eot_token_id(7)

    file = write_gguf(hf, tmp_path / "m.gguf", meta=meta)
    c = vgguf.gguf_config(file)
    assert c == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": [2, 7],
    }
    config = ModelConfig.from_hf_dict(c)
    assert config.eos_token_ids == (2, 7) and config.rope_scaling is not None


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = build_hf("llama", rope_scaling=dict(rope), rope_theta=500000.0, head_dim=32)
    factors = llama3_rope_factors(32, 500000.0, 8.0, 8192)
    assert factors.max() > 1.0 and factors.min() == 1.0
    file = write_gguf(hf, tmp_path / "m.gguf", extra_tensors={"rope_freqs.weight": factors})
    out = vgguf.convert_gguf(file, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == rope
    assert "rope_freqs.weight" not in read_dir(out)
    assert_logits_match(out, hf)


# ---- errors ------------------------------------------------------------------------------------
def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(ValueError, match=r"not a GGUF file"):
        vgguf.convert_gguf(bad, tmp_path / "out")
    with pytest.raises(ValueError, match=r"not a GGUF file"):
        resolve_model(str(bad))
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ValueError, match=r"not a readable GGUF file"):
        vgguf.convert_gguf(truncated, tmp_path / "out")


def test_unsupported_architecture(tmp_path: Path) -> None:
    file = write_gguf(build_hf("llama"), tmp_path / "m.gguf", arch="phi3")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'phi3'.*'llama', 'qwen2'"):
        vgguf.convert_gguf(file, tmp_path / "out")


def test_unsupported_quantization_type(tmp_path: Path) -> None:
    hf = build_hf("llama")
    file = write_gguf(
        hf,
        tmp_path / "m.gguf",
        drop={"blk.0.ffn_up.weight"},
        extra_tensors={"blk.0.ffn_up.weight": np.ones((112, 64), dtype=np.int8)},
    )
    with pytest.raises(
        ValueError, match=r"unsupported quantization type.*\['I8'\].*supported:.*Q4_1"
    ):
        vgguf.convert_gguf(file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_unexpected_and_misshaped_tensors(tmp_path: Path) -> None:
    hf = build_hf("llama")
    file = write_gguf(hf, tmp_path / "a.gguf", drop={"blk.1.ffn_down.weight", "output_norm.weight"})
    with pytest.raises(ValueError, match=r"lacks 2 tensor.*blk\.1\.ffn_down\.weight.*output_norm"):
        vgguf.convert_gguf(file, tmp_path / "out")
    extra = {"blk.0.attn_rot_embd.weight": np.ones(8, dtype=np.float32)}
    file = write_gguf(hf, tmp_path / "b.gguf", extra_tensors=extra)
    with pytest.raises(ValueError, match=r"does not use.*blk\.0\.attn_rot_embd\.weight"):
        vgguf.convert_gguf(file, tmp_path / "out")
    wrong = {"blk.0.attn_norm.weight": np.ones(32, dtype=np.float32)}
    file = write_gguf(hf, tmp_path / "c.gguf", drop=set(wrong), extra_tensors=wrong)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_norm\.weight.*shape \(32,\).*\(64,\)"):
        vgguf.convert_gguf(file, tmp_path / "out")


def test_missing_metadata(tmp_path: Path) -> None:
    hf = build_hf("llama")
    file = write_gguf(hf, tmp_path / "m.gguf")
    reader = vgguf.open_gguf(file)
    del reader.fields["llama.block_count"]
    with pytest.raises(ValueError, match=r"lacks the metadata key llama\.'?block_count"):
        vgguf.gguf_config(reader)


# ---- cache and resolution ----------------------------------------------------------------------
def test_cache_layout_and_reuse(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = write_gguf(build_hf("llama"), tmp_path / "m.gguf")
    first = vgguf.gguf_checkpoint_dir(file)
    sha = vgguf.file_sha256(file)
    assert first == cache_dir / "gguf" / sha[:16]
    assert sorted(p.name for p in (cache_dir / "gguf").iterdir()) == [sha[:16]]  # no temp left
    source = json.loads((first / vgguf.SOURCE_FILE).read_text())
    assert (source["sha256"], source["format"], source["tokenizer"]) == (sha, 1, False)
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*a: object, **k: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(vgguf, "convert_gguf", no_conversion)
    vgguf._SHA_MEMO.clear()  # as a fresh process would: hash again
    assert resolve_model(str(file)) == str(first)
    assert resolve_model(str(first)) == str(first)  # idempotent
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_outdated_cache_entry_is_replaced(tmp_path: Path) -> None:
    file = write_gguf(build_hf("llama"), tmp_path / "m.gguf")
    first = vgguf.gguf_checkpoint_dir(file)
    source = json.loads((first / vgguf.SOURCE_FILE).read_text())
    (first / vgguf.SOURCE_FILE).write_text(json.dumps({**source, "format": 0}))
    (first / "stale-marker").write_text("x")
    again = vgguf.gguf_checkpoint_dir(file)
    assert again == first and not (first / "stale-marker").exists()
    assert json.loads((first / vgguf.SOURCE_FILE).read_text())["format"] == vgguf.FORMAT_VERSION
    assert len(list(first.parent.iterdir())) == 1


def test_failed_conversion_leaves_nothing(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = write_gguf(build_hf("llama"), tmp_path / "m.gguf")

    def crash(*a: object, **k: object) -> bool:
        raise RuntimeError("crash while writing the tokenizer")

    monkeypatch.setattr(vgguf, "_save_tokenizer", crash)
    with pytest.raises(RuntimeError, match="crash"):
        vgguf.gguf_checkpoint_dir(file)
    assert list((cache_dir / "gguf").iterdir()) == []  # weights were written, but only in tmp
    monkeypatch.undo()
    monkeypatch.setenv("VATTENTION_CACHE_DIR", str(cache_dir))
    # a crashed process's temporary directory (old) is removed by the next conversion
    stale = cache_dir / "gguf" / f".{vgguf.file_sha256(file)[:16]}.tmp-1-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))
    vgguf.gguf_checkpoint_dir(file)
    assert not stale.exists()


def test_cache_root_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VATTENTION_CACHE_DIR", str(tmp_path / "v"))
    assert vgguf.cache_root() == tmp_path / "v"
    monkeypatch.delenv("VATTENTION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vgguf.cache_root() == tmp_path / "xdg" / "vattention"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert vgguf.cache_root() == tmp_path / "home" / ".cache" / "vattention"


def test_resolve_model_inputs(tmp_path: Path, cache_dir: Path, hf_checkpoint) -> None:
    _, hf_dir = hf_checkpoint("llama")
    assert resolve_model(str(hf_dir)) == str(hf_dir)  # HF directories: unchanged
    assert resolve_model("tiny") == "tiny"  # presets: unchanged
    assert resolve_model("no-such-model") == "no-such-model"  # load_model rejects it
    one = tmp_path / "one"
    one.mkdir()
    write_gguf(build_hf("llama"), one / "model.gguf")
    converted = resolve_model(str(one))
    assert Path(converted).parent == cache_dir / "gguf"
    assert (Path(converted) / "config.json").is_file()
    write_gguf(build_hf("qwen2"), one / "other.gguf")
    with pytest.raises(ValueError, match=r"2 GGUF files.*model\.gguf.*other\.gguf"):
        resolve_model(str(one))


def test_unpermute_inverts_llamacpp_permute() -> None:
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    for heads in (1, 3, 6):
        assert np.array_equal(vgguf.unpermute_qk(llamacpp_permute(w, heads), heads), w)
    assert not np.array_equal(llamacpp_permute(w, 3), w)


def test_sharded_output(tmp_path: Path) -> None:
    hf = build_hf("llama")
    file = write_gguf(hf, tmp_path / "m.gguf")
    out = vgguf.convert_gguf(file, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (out / "model.safetensors").exists()
    assert_logits_match(out, hf)
