"""GGUF `qwen3` (dense) -> HF-style directory: a tiny Qwen3 written as llama.cpp writes it (arch
`qwen3`, Q/K rows in HF order, `blk.N.attn_q_norm`/`attn_k_norm`) converts bit-exactly and gives
HF's logits; errors name missing q/k norms. Reuses `test_gguf`'s writer and checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_gguf as base
import torch
from test_qwen3 import build_qwen3

from vattention import LLM, SamplingParams
from vattention.models import ModelConfig
from vattention.models import gguf as vgguf

gguf = pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def qwen3_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`test_gguf.write_gguf` names the q/k norms; every test converts into its own cache."""
    monkeypatch.setitem(base.LAYER, "self_attn.q_norm", "attn_q_norm")
    monkeypatch.setitem(base.LAYER, "self_attn.k_norm", "attn_k_norm")
    monkeypatch.setenv("VATTENTION_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_f32_gguf_converts_exactly(tmp_path: Path, tied: bool) -> None:
    hf = build_qwen3(tie_word_embeddings=tied)
    file = base.write_gguf(hf, tmp_path / "m.gguf", arch="qwen3")
    names = {t.name for t in vgguf.open_gguf(file).tensors}
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    out = vgguf.convert_gguf(file, tmp_path / "out")
    got = base.read_dir(out)
    want = {k: v for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and tied)}
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name  # bit-exact, Q/K rows not permuted
    base.assert_logits_match(out, hf)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 32
    assert (config["attention_bias"], config["use_sliding_window"]) == (False, False)
    assert config["tie_word_embeddings"] == tied and "mlp_bias" not in config
    parsed = ModelConfig.from_pretrained(out)
    assert (parsed.model_type, parsed.qk_norm, parsed.head_dim) == ("qwen3", True, 32)


def test_converted_qwen3_loads_in_transformers(tmp_path: Path) -> None:
    """The converted directory is a real HF Qwen3 checkpoint (config.json included)."""
    from transformers import AutoModelForCausalLM

    hf = build_qwen3()
    out = vgguf.convert_gguf(base.write_gguf(hf, tmp_path / "m.gguf", arch="qwen3"), tmp_path / "o")
    again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(again).__name__ == "Qwen3ForCausalLM"
    for ids in base.PROMPTS:
        torch.testing.assert_close(base.hf_logits(again, ids), base.hf_logits(hf, ids))


def test_qwen3_q8_0_equals_the_dequantized_model(tmp_path: Path) -> None:
    hf = build_qwen3(intermediate_size=128)  # Q8_0 blocks: rows of a multiple of 32
    out = vgguf.convert_gguf(
        base.write_gguf(hf, tmp_path / "m.gguf", "Q8_0", arch="qwen3"), tmp_path / "out"
    )
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:  # the 1-D norms (q/k norms included) stay F32
                deq = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)
                p.copy_(torch.from_numpy(deq))
    got = base.read_dir(out)
    for name, t in hf.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(got[name], t), name
    base.assert_logits_match(out, hf)


def test_llm_generates_from_a_qwen3_gguf_file_like_hf(tmp_path: Path) -> None:
    hf = build_qwen3()
    file = base.write_gguf(hf, tmp_path / "tiny.gguf", arch="qwen3")
    want = []
    for p in base.PROMPTS:  # uncached greedy reference
        ids = list(p)
        for _ in range(10):
            ids.append(int(base.hf_logits(hf, ids)[-1].argmax()))
        want.append(ids[len(p) :])
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(str(file), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=2) as llm:
        assert Path(llm.engine.model_path).parent == tmp_path / "cache" / "gguf"
        outs = llm.generate(base.PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == want


def test_qwen3_gguf_errors(tmp_path: Path) -> None:
    hf = build_qwen3()
    file = base.write_gguf(hf, tmp_path / "a.gguf", arch="qwen3", drop={"blk.1.attn_k_norm.weight"})
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*blk\.1\.attn_k_norm\.weight"):
        vgguf.convert_gguf(file, tmp_path / "out")
    wrong = {"blk.0.attn_q_norm.weight": np.ones(16, dtype=np.float32)}
    file = base.write_gguf(
        hf, tmp_path / "b.gguf", arch="qwen3", drop=set(wrong), extra_tensors=wrong
    )
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q_norm\.weight.*shape \(16,\).*\(32,\)"):
        vgguf.convert_gguf(file, tmp_path / "out")
    # q/k norms belong to qwen3 only: a llama GGUF that has them is rejected, not half-loaded
    file = base.write_gguf(hf, tmp_path / "c.gguf", arch="llama")
    with pytest.raises(ValueError, match=r"llama model does not use.*attn_k_norm"):
        vgguf.convert_gguf(file, tmp_path / "out")
