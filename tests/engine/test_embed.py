"""Embeddings (`LLM.embed`, `engine.pooling`): the last prompt token's final hidden state, equal
to HF's (`output_hidden_states`, after the final norm) and L2-normalized, on both caches, with
chunked prefill, next to generation requests, and through prefix-cache hits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_helpers import prompts, save_tiny

from vattention import LLM, PoolingParams, SamplingParams

CACHES = ["vattention", "paged"]


def _llm(path: Path, kv_cache: str, **kw: object) -> LLM:
    opts: dict[str, object] = dict(
        kv_cache=kv_cache, dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4,
        max_num_batched_tokens=32, kv_page_size=64 * 1024, block_size=16,
    )  # fmt: skip
    opts.update(kw)
    return LLM(str(path), **opts)  # type: ignore[arg-type]


def _hf_last_hidden(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1]  # after the final norm


@pytest.mark.parametrize("kv_cache", CACHES)
def test_embeddings_equal_hfs_last_hidden_state(tmp_path: Path, kv_cache: str) -> None:
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(5, seed=2, low=5, high=70)  # longer than the 32-token step: chunked
    with _llm(tmp_path / "m", kv_cache) as llm:
        outs = llm.embed(batch, use_tqdm=False)
        raw = llm.embed(batch[:2], PoolingParams(normalize=False), use_tqdm=False)
        cut = llm.embed(batch[:1], PoolingParams(dimensions=16), use_tqdm=False)
        with pytest.raises(ValueError, match="exceeds the model's hidden size"):
            llm.embed(batch[:1], PoolingParams(dimensions=10_000), use_tqdm=False)
    for out, ids in zip(outs, batch, strict=True):
        want = torch.nn.functional.normalize(_hf_last_hidden(hf, ids), dim=0)
        got = torch.tensor(out.outputs.embedding)
        assert out.prompt_token_ids == ids and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert abs(float(got.norm()) - 1.0) < 1e-5
    torch.testing.assert_close(
        torch.tensor(raw[1].outputs.embedding), _hf_last_hidden(hf, batch[1]), atol=1e-4, rtol=1e-4
    )
    want_cut = torch.nn.functional.normalize(_hf_last_hidden(hf, batch[0])[:16], dim=0)
    torch.testing.assert_close(torch.tensor(cut[0].outputs.embedding), want_cut, atol=1e-4,
                               rtol=1e-4)  # fmt: skip


def test_embeddings_next_to_generation_and_through_prefix_hits(tmp_path: Path) -> None:
    """Embedding and generation requests in the same steps change neither; a prompt whose
    leading pages come from the prefix cache embeds as it does computed afresh."""
    save_tiny("llama", tmp_path / "m")
    batch = prompts(4, seed=5, low=40, high=80)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with _llm(tmp_path / "m", "vattention", kv_cache_memory=8 << 20, kv_page_size=4096) as llm:
        alone = llm.embed(batch, use_tqdm=False)
        text = llm.generate(batch, params, use_tqdm=False)
        engine = llm.engine
        rids = [engine.add_request(p, PoolingParams()) for p in batch]  # hits: cached pages
        gen = [engine.add_request(p, params) for p in batch]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step()})
        assert engine.scheduler.prefix is not None and engine.scheduler.prefix.hit_tokens > 0
    for rid, a in zip(rids, alone, strict=True):
        torch.testing.assert_close(torch.tensor(done[rid].embedding),
                                   torch.tensor(a.outputs.embedding), atol=1e-5, rtol=1e-5)  # fmt: skip
    assert [done[g].outputs[0].token_ids for g in gen] == [t.token_ids for t in text]


def test_pooling_params_are_checked() -> None:
    with pytest.raises(ValueError, match="dimensions must be a positive int"):
        PoolingParams(dimensions=0)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        PoolingParams(normalize="yes")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache", CACHES)
def test_embeddings_on_cuda_equal_the_cpu(tmp_path: Path, kv_cache: str) -> None:
    """On CUDA (graphs for the other steps, the pooling steps eager) next to generation."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    save_tiny("llama", tmp_path / "m")
    batch = prompts(6, seed=3, low=5, high=90)
    got = {}
    for device in ("cuda", "cpu"):
        opts: dict[str, object] = {"device": device}
        if device == "cuda":  # the driver's 2 MiB pages
            opts.update(kv_cache_memory=256 << 20, kv_page_size=None)
        elif kv_cache == "paged":
            opts["attention_backend"] = "paged_torch"
        with _llm(tmp_path / "m", kv_cache, **opts) as llm:
            engine = llm.engine
            rids = [engine.add_request(p, PoolingParams()) for p in batch]
            gen = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=6))
                   for p in batch]  # fmt: skip
            done = {}
            while engine.has_unfinished_requests():
                done.update({o.request_id: o for o in engine.step()})
            got[device] = ([done[r].embedding for r in rids],
                           [done[g].outputs[0].token_ids for g in gen])  # fmt: skip
    for a, b in zip(got["cuda"][0], got["cpu"][0], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)
    assert got["cuda"][1] == got["cpu"][1]
