"""load_model: errors that name the problem, dummy weights, presets, meta-device builds."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import make_backend, run_step
from safetensors import safe_open
from safetensors.torch import save_file

from vattention.models import get_preset, load_model


def rewrite_checkpoint(path, edit) -> None:
    """Load every tensor of `path/model.safetensors`, apply `edit(dict)`, write it back."""
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_safetensors(hf_checkpoint) -> None:
    _, path = hf_checkpoint("llama")
    (path / "model.safetensors").unlink()
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_model(path, dtype=torch.float32)


def test_missing_tensor_named(hf_checkpoint) -> None:
    _, path = hf_checkpoint("llama")
    rewrite_checkpoint(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.self_attn\.k_proj"):
        load_model(path, dtype=torch.float32)


def test_wrong_shape_named(hf_checkpoint) -> None:
    _, path = hf_checkpoint("llama")

    def shrink(t: dict) -> None:
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]

    rewrite_checkpoint(path, shrink)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(111, 64\)"):
        load_model(path, dtype=torch.float32)


def test_unexpected_tensor_named(hf_checkpoint) -> None:
    _, path = hf_checkpoint("llama")
    rewrite_checkpoint(path, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.extra\.weight'"):
        load_model(path, dtype=torch.float32)


def test_ignored_and_tied_tensors(hf_checkpoint) -> None:
    """Old checkpoints carry rotary inv_freq; tied ones may still carry lm_head: both skipped."""
    _, path = hf_checkpoint("qwen2", tie_word_embeddings=True)

    def add(t: dict) -> None:
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        t["lm_head.weight"] = torch.zeros_like(t["model.embed_tokens.weight"])

    rewrite_checkpoint(path, add)
    model = load_model(path, dtype=torch.float32)
    assert model.lm_head is None and model.head_weight().abs().sum() > 0


def test_missing_shard(hf_checkpoint) -> None:
    _, path = hf_checkpoint("llama", max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(path, dtype=torch.float32)


def test_unknown_architecture_in_directory(hf_checkpoint) -> None:
    _, path = hf_checkpoint("llama")
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["FalconForCausalLM"], model_type="falcon")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FalconForCausalLM.*supported"):
        load_model(path)


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="neither a local model directory nor a preset"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="load_format='dummy'"):
        load_model("tiny")
    with pytest.raises(ValueError, match="unknown load_format"):
        load_model("tiny", load_format="gguf")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny", dtype="int3", load_format="dummy")


def test_dummy_tiny_runs_finite_in_bf16() -> None:
    model = load_model("tiny", dtype=torch.bfloat16, load_format="dummy", seed=1)
    assert model.head_weight().dtype == torch.bfloat16
    out = run_step(model, make_backend(model), [0, 1], [0, 0], [[1, 2, 3, 4], [9, 8]])
    assert all(torch.isfinite(o).all() and o.std() > 0 for o in out)
    again = load_model("tiny", dtype=torch.bfloat16, load_format="dummy", seed=1)
    torch.testing.assert_close(again.head_weight(), model.head_weight(), rtol=0, atol=0)


def test_dummy_from_directory_keeps_its_config(hf_checkpoint) -> None:
    _, path = hf_checkpoint("mistral")
    model = load_model(path, dtype=torch.float32, load_format="dummy")
    assert model.config.model_type == "mistral"
    assert model.model.layers[0].input_layernorm.weight.eq(1).all()


@pytest.mark.parametrize("name", ["tiny", "yi-6b", "llama-3-8b", "yi-34b"])
def test_presets_on_meta_device(name: str) -> None:
    model = load_model(name, load_format="dummy", device="meta")
    assert sum(p.numel() for p in model.parameters()) == get_preset(name).num_parameters()
    assert model.head_weight().dtype == torch.bfloat16


@pytest.mark.gpu
def test_llama3_8b_dummy_on_gpu() -> None:
    model = load_model("llama-3-8b", load_format="dummy", device="cuda")
    out = run_step(model, make_backend(model, slots=2, max_len=32), [0, 1], [0, 0], [[1] * 16, [7]])
    assert all(torch.isfinite(o).all() for o in out)
    assert torch.cuda.memory_allocated() < 20 * 2**30
