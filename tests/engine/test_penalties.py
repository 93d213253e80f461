"""Repetition, frequency and presence penalties: the sampler's algebra against a plain
per-token reference, and `LLM.generate` against Hugging Face and a hand-written greedy loop
(token for token, with async scheduling, both caches and preemption)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from llm_helpers import prompts, save_tiny

from vattention import LLM, SamplingParams
from vattention.engine.penalties import PenaltyBatch, PenaltyState
from vattention.engine.sampler import Sampler, SamplingMetadata

CACHES = ["vattention", pytest.param("paged", marks=pytest.mark.paged)]


def _reference(logits: list[float], prompt: list[int], output: list[int],
               rep: float, freq: float, pres: float) -> list[float]:  # fmt: skip
    out = list(logits)
    for t in range(len(out)):
        count = output.count(t)
        if t in prompt or count:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        out[t] -= freq * count + pres * (count > 0)
    return out


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    vocab=st.integers(2, 12),
    rows=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_penalised_logits_equal_the_per_token_definition(
    data: st.DataObject, vocab: int, rows: int, seed: int
) -> None:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    ids = st.lists(st.integers(0, vocab - 1), max_size=8)
    pen_rows = sorted(data.draw(st.sets(st.integers(0, rows - 1), min_size=1)))
    cases = []
    for _ in pen_rows:
        factors = (
            data.draw(st.floats(0.5, 2.0)),
            data.draw(st.floats(-2.0, 2.0)),
            data.draw(st.floats(-2.0, 2.0)),
        )
        cases.append((data.draw(ids), data.draw(ids), factors))
    states = [PenaltyState(p, o, vocab, "cpu") for p, o, _ in cases]
    batch = PenaltyBatch.build(pen_rows, states, [f for *_, f in cases], torch.device("cpu"))
    got = batch.apply(logits)
    for r in range(rows):
        if r in pen_rows:
            p, o, (rep, freq, pres) = cases[pen_rows.index(r)]
            want = torch.tensor(_reference(logits[r].tolist(), p, o, rep, freq, pres))
        else:
            want = logits[r]
        torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-5)


def test_sampler_counts_each_chosen_token_and_keeps_raw_logprobs() -> None:
    vocab = 6
    logits = torch.tensor([[0.0, 5.0, 4.9, 0.0, 0.0, 0.0], [0.0, 5.0, 4.9, 0.0, 0.0, 0.0]])
    plain = SamplingParams(temperature=0, logprobs=0)
    penal = SamplingParams(temperature=0, frequency_penalty=1.0, logprobs=0)
    state = PenaltyState([], [], vocab, "cpu")
    sampler = Sampler()
    for step, want in enumerate([1, 2, 1]):  # token 1 once, then 2 (5 - 1 < 4.9), then 1 again
        meta = SamplingMetadata.build([plain, penal], device="cpu", penalty_states=[None, state])
        out = sampler(logits, meta)
        assert out.token_ids.tolist() == [1, want], step
        # log-probabilities are the model's: the raw logits', not the penalised ones
        raw = torch.log_softmax(logits[1], -1)[want]
        assert out.logprobs is not None
        torch.testing.assert_close(out.logprobs.sampled[1], raw)
    assert state.counts.tolist() == [0, 2, 1, 0, 0, 0]


def test_logit_bias_moves_only_its_rows_tokens() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.5], [0.0, 3.0, 1.0, 0.5], [0.0, 3.0, 1.0, 0.5]])
    rows = [
        SamplingParams(temperature=0, logit_bias={2: 2.5}, logprobs=0),  # 1 + 2.5 > 3
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=1, logit_bias={0: 100, 1: -100}),  # forced
    ]
    gens = [None, None, torch.Generator().manual_seed(1)]
    meta = SamplingMetadata.build(rows, gens, device="cpu")
    out = Sampler()(logits, meta)
    assert out.token_ids.tolist() == [2, 1, 0]
    assert out.logprobs is not None  # the model's own log-probabilities, not the biased ones
    torch.testing.assert_close(out.logprobs.sampled[0], torch.log_softmax(logits[0], -1)[2])


def test_rows_with_penalties_need_their_state() -> None:
    with pytest.raises(ValueError, match="penalty states"):
        SamplingMetadata.build([SamplingParams(presence_penalty=0.5)], device="cpu")


def _llm(path: Path, kv_cache: str, **kw: object) -> LLM:
    opts: dict[str, object] = dict(
        kv_cache=kv_cache, dtype="float32", device="cpu", max_model_len=128, max_num_seqs=4,
        max_num_batched_tokens=32, kv_page_size=64 * 1024, block_size=16,
    )  # fmt: skip
    opts.update(kw)
    return LLM(str(path), **opts)  # type: ignore[arg-type]


def _hf_repetition(model: torch.nn.Module, prompt: list[int], new: int, rep: float) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, eos_token_id=None, pad_token_id=0, repetition_penalty=rep,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _greedy_loop(model: torch.nn.Module, prompt: list[int], new: int, freq: float,
                 pres: float) -> list[int]:  # fmt: skip
    """Greedy decoding by hand over the HF model's uncached forward, penalising as defined."""
    out: list[int] = []
    for _ in range(new):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
        pen = torch.tensor(_reference(logits.tolist(), [], out, 1.0, freq, pres))
        out.append(int(pen.argmax()))
    return out


@pytest.mark.parametrize("kv_cache", CACHES)
def test_repetition_penalty_matches_hf_generate(tmp_path: Path, kv_cache: str) -> None:
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(4, seed=5)
    want = [_hf_repetition(hf, p, 20, 1.3) for p in batch]
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    rep = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    with _llm(tmp_path / "m", kv_cache) as llm:
        outs = llm.generate(batch, [rep, plain, rep, plain], use_tqdm=False)
        free = llm.generate(batch[1:2], plain, use_tqdm=False)
    assert [o.token_ids for o in outs][0::2] == want[0::2]
    assert outs[1].token_ids == free[0].token_ids  # a neighbour's penalty changes nothing
    assert want[0] != _hf_repetition(hf, batch[0], 20, 1.0)  # the penalty mattered


@pytest.mark.parametrize("kv_cache", CACHES)
def test_frequency_and_presence_match_a_greedy_loop_under_preemption(
    tmp_path: Path, kv_cache: str
) -> None:
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(4, seed=7, low=20, high=50)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            frequency_penalty=0.7, presence_penalty=0.4)  # fmt: skip
    want = [_greedy_loop(hf, p, 20, 0.7, 0.4) for p in batch]
    # 6 pages of 64 KiB: requests are preempted and recomputed; their counts must survive
    with _llm(tmp_path / "m", kv_cache, kv_cache_memory=6 * 64 * 1024) as llm:
        outs = llm.generate(batch, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == want


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_min_tokens_holds_back_stop_tokens_and_strings(
    tmp_path: Path, async_scheduling: bool
) -> None:
    """Below `min_tokens` neither a stop token nor EOS can be sampled (the sampler bans them,
    counting the tokens of steps still in flight) and nothing stops the request; from then on
    they stop it as usual."""
    save_tiny("llama", tmp_path / "m")
    prompt = prompts(1, seed=2)[0]
    with _llm(tmp_path / "m", "vattention", async_scheduling=async_scheduling) as llm:
        free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                     ignore_eos=True), use_tqdm=False)[0]  # fmt: skip
        stop = free.token_ids[0]  # the first greedy token, made a stop token
        plain = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop])
        held = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop], min_tokens=5)
        a, b = llm.generate([prompt, prompt], [plain, held], use_tqdm=False)
    assert a.token_ids == [stop] and a.outputs[0].finish_reason == "stop"
    assert len(b.token_ids) >= 5 and stop not in b.token_ids[:5]
    if stop in b.token_ids:  # allowed again from the sixth token on: it ends the request there
        assert b.token_ids[-1] == stop and b.outputs[0].finish_reason == "stop"
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
