"""GPU: `LLM.generate` end to end on CUDA (CUDA graphs, async scheduling, both caches).

A tiny random Llama in float32 (HF format, saved and loaded through the real loader): greedy
tokens equal HF `generate`'s, with async scheduling on (the default) and off, with CUDA graphs
(decode and mixed steps, or decode only) and eagerly, with either mapping mode, for the
vAttention cache and the paged baseline; and a mixed batch (stop tokens,
seeded sampling) gives the same tokens with async scheduling on and off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_helpers import hf_greedy, prompts, save_tiny

from vattention import LLM, SamplingParams

pytestmark = pytest.mark.gpu
NEW = 20


def _llm(path: Path, kv_cache: str, **kw: object) -> LLM:
    opts: dict[str, object] = dict(
        kv_cache=kv_cache, dtype="float32", device="cuda", max_model_len=128, max_num_seqs=8,
        max_num_batched_tokens=64, kv_cache_memory=256 << 20, block_size=16,
    )  # fmt: skip
    opts.update(kw)
    return LLM(str(path), **opts)  # type: ignore[arg-type]


def _on_cuda_and_cpu(
    path: Path, kv_cache: str, batch: list, params: list[SamplingParams]
) -> tuple[list, list]:
    """`generate(batch, params)` on CUDA, then on the CPU engine (the paged cache there with
    its torch backend): (cuda outputs, cpu outputs)."""
    cpu: dict[str, object] = {"device": "cpu", "kv_cache_memory": 64 << 20}
    if kv_cache == "paged":
        cpu["attention_backend"] = "paged_torch"
    runs = []
    for opts in ({}, cpu):
        with _llm(path, kv_cache, **opts) as llm:
            runs.append(llm.generate(batch, params, use_tqdm=False))
    return runs[0], runs[1]


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_generate_on_cuda_matches_hf_in_every_mode(tmp_path: Path, kv_cache: str) -> None:
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(10, seed=4, low=5, high=60)
    want = [hf_greedy(hf, p, NEW) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    modes: list[dict[str, object]] = [
        {}, {"async_scheduling": False}, {"enforce_eager": True}, {"mixed_graph_tokens": 0},
        {"kv_mapping": "thread"},
    ]  # fmt: skip
    for opts in modes:
        with _llm(tmp_path / "m", kv_cache, **opts) as llm:
            runner = llm.engine.runner
            assert (runner.graphs is None) == bool(opts.get("enforce_eager"))
            outs = llm.generate(batch, params, use_tqdm=False)
            mixed_expected = not opts.get("enforce_eager") and opts.get("mixed_graph_tokens") != 0
            assert (runner.graph_steps["mixed"] > 0) == mixed_expected, (opts, runner.graph_steps)
        assert [o.token_ids for o in outs] == want, opts
    torch.cuda.synchronize()


def test_async_scheduling_on_cuda_with_stops_and_seeds(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m")
    batch = prompts(8, seed=6, low=5, high=60)
    with _llm(tmp_path / "m", "vattention") as llm:
        probe = llm.generate(batch[:1], SamplingParams(temperature=0, max_tokens=NEW),
                             use_tqdm=False)  # fmt: skip
    stop_on = probe[0].token_ids[NEW // 2]
    params = [
        SamplingParams(temperature=0, max_tokens=NEW, stop_token_ids=[stop_on]),
        SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=NEW),
    ] * 4
    runs = []
    for mode in (False, True):
        with _llm(tmp_path / "m", "vattention", async_scheduling=mode) as llm:
            outs = llm.generate(batch, params, use_tqdm=False)
            assert not llm.engine.has_unfinished_requests()
        runs.append([(o.token_ids, o.outputs[0].finish_reason) for o in outs])
    assert runs[0] == runs[1]
    first = probe[0].token_ids.index(stop_on)  # the greedy row stops at its first stop token
    assert runs[1][0] == (probe[0].token_ids[: first + 1], "stop")


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_sampling_options_on_cuda_equal_the_cpu(tmp_path: Path, kv_cache: str) -> None:
    """Penalties (counts on the device, under async scheduling and CUDA graphs), logit bias,
    min_tokens and n greedy choices give on CUDA the tokens the CPU engine gives (float32)."""
    save_tiny("llama", tmp_path / "m")
    batch = prompts(6, seed=8, low=5, high=60)
    common = dict(temperature=0, max_tokens=NEW, ignore_eos=True)
    params = [
        SamplingParams(**common, repetition_penalty=1.3),  # type: ignore[arg-type]
        SamplingParams(**common, frequency_penalty=0.8, presence_penalty=0.3),  # type: ignore[arg-type]
        SamplingParams(**common, logit_bias={7: 3.0, 9: -100}),  # type: ignore[arg-type]
        SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW // 2, stop_token_ids=[3]),
        SamplingParams(**common, n=2),  # type: ignore[arg-type]
        SamplingParams(**common),  # type: ignore[arg-type]
    ]
    gpu, cpu = _on_cuda_and_cpu(tmp_path / "m", kv_cache, batch, params)
    assert [[c.token_ids for c in o.outputs] for o in gpu] == [
        [c.token_ids for c in o.outputs] for o in cpu
    ]
    assert len(gpu[4].outputs) == 2
    torch.cuda.synchronize()


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_prompt_logprobs_on_cuda_equal_the_cpu(tmp_path: Path, kv_cache: str) -> None:
    """Prompt log-probabilities (eager steps, logits of prompt rows in slices, chunked prefill
    over several steps) on CUDA equal the CPU engine's (float32), next to requests that
    replay CUDA graphs and do not ask for them."""
    save_tiny("llama", tmp_path / "m")
    batch = prompts(4, seed=9, low=20, high=90)  # > max_num_batched_tokens: chunked
    params = [
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=3),
        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True),
    ] * 2
    gpu, cpu = _on_cuda_and_cpu(tmp_path / "m", kv_cache, batch, params)
    for g, c, p in zip(gpu, cpu, batch, strict=True):
        assert g.outputs[0].token_ids == c.outputs[0].token_ids
        if g.prompt_logprobs is None:
            assert c.prompt_logprobs is None
            continue
        assert len(g.prompt_logprobs) == len(p) and g.prompt_logprobs[0] is None
        for a, b in zip(g.prompt_logprobs[1:], c.prompt_logprobs[1:], strict=True):  # type: ignore[index]
            assert a is not None and b is not None
            assert abs(a.logprob - b.logprob) < 1e-3
    torch.cuda.synchronize()


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_structured_outputs_on_cuda_equal_the_cpu(tmp_path: Path, kv_cache: str) -> None:
    """The grammar's token bitmask applied to CUDA logits (async scheduling pauses while a
    constrained request runs; CUDA graphs replay) gives the CPU engine's tokens, and each
    output follows its grammar."""
    pytest.importorskip("xgrammar")
    import re

    from vattention.engine.structured import GuidedDecodingParams

    save_tiny("llama", tmp_path / "m", vocab_size=300)  # the byte-level fallback tokenizer
    batch = ["Hello", "Q: what?", "abc", "x" * 20]
    choices = ["yes", "no", "maybe"]
    params = [
        SamplingParams(temperature=0, max_tokens=16,
                       guided_decoding=GuidedDecodingParams(choice=choices)),
        SamplingParams(temperature=0, max_tokens=16,
                       guided_decoding=GuidedDecodingParams(regex="[a-z]{3,8}")),
        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=16,
                       guided_decoding=GuidedDecodingParams(choice=choices)),
    ]  # fmt: skip
    gpu, cpu = _on_cuda_and_cpu(tmp_path / "m", kv_cache, batch, params)
    # the seeded row draws from a generator on its own device: CUDA's and the CPU's streams
    # differ, so only the greedy rows must agree token for token
    assert [o.outputs[0].token_ids for o in gpu[:3]] == [o.outputs[0].token_ids for o in cpu[:3]]
    assert gpu[0].outputs[0].text in choices and gpu[3].outputs[0].text in choices
    assert cpu[3].outputs[0].text in choices
    assert re.fullmatch("[a-z]{3,8}", gpu[1].outputs[0].text)
    torch.cuda.synchronize()
