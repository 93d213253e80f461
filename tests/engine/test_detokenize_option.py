"""`SamplingParams(detokenize=False)`: token ids only, no text and no detokenizer; stop strings
are refused (they need text), stop token ids, EOS, length limits and logprobs still work.

Also: the all-greedy fast path of `SamplingMetadata.for_requests` equals `build`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_helpers import prompts, save_tiny

from tests.engine.helpers import FakeKVCache, FakeModel, byte_tokenizer, drive
from vattention import LLM, SamplingParams
from vattention.engine.logprobs import HostLogprobs
from vattention.engine.outputs import RequestOutput
from vattention.engine.request import FinishReason, Request
from vattention.engine.sampler import SamplingMetadata
from vattention.engine.scheduler import Scheduler
from vattention.engine.scheduling import SchedulerConfig

EOS = 256  # byte_tokenizer's <eos>


def scheduler() -> Scheduler:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
    return Scheduler(config, FakeKVCache(4, 1000, batched=True))


def test_the_option_is_validated() -> None:
    assert SamplingParams().detokenize is True
    assert SamplingParams(detokenize=False, stop_token_ids=[3]).detokenize is False
    with pytest.raises(TypeError, match="detokenize must be a bool, got int"):
        SamplingParams(detokenize=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stop strings .* need detokenize=True"):
        SamplingParams(detokenize=False, stop=["\n"])
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(detokenize=False, stop="###")


def test_no_detokenizer_and_no_text() -> None:
    tok = byte_tokenizer()
    prompt = tok.encode("Hi").ids
    on = Request("on", prompt, SamplingParams(max_tokens=4), tokenizer=tok)
    off = Request("off", prompt, SamplingParams(max_tokens=4, detokenize=False), tokenizer=tok)
    assert on.detokenizer is not None and off.detokenizer is None
    for r in (on, off):
        sched = scheduler()
        sched.add_request(r)
        drive(sched, FakeModel(vocab=90))  # ids < 94: one printable ASCII byte each
    assert on.output_token_ids == off.output_token_ids and len(off.output_token_ids) == 4
    assert on.output_text == tok.decode(on.output_token_ids) and on.output_text
    assert off.output_text == "" and off.stream_text() == ""
    out = RequestOutput.from_request(off)
    assert out.text == "" and out.token_ids == off.output_token_ids
    assert out.outputs[0].finish_reason == "length"


def run(sched: Scheduler, model: FakeModel, pipelined: bool) -> None:
    """To the end; pipelined: schedule step i+1 before step i's tokens are known (async)."""
    if not pipelined:
        drive(sched, model)
        return
    prev = sched.schedule()
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update(prev, model.run(prev))
        prev = out
    sched.update(prev, model.run(prev))


@pytest.mark.parametrize("pipelined", [False, True])
def test_stop_token_ids_and_eos_still_end_a_request(pipelined: bool) -> None:
    tok = byte_tokenizer()
    model = FakeModel(vocab=200)
    probe = Request("probe", [1, 2, 3], SamplingParams(max_tokens=10, detokenize=False))
    sched = scheduler()
    sched.add_request(probe)
    drive(sched, model)
    stop_on = probe.output_token_ids[3]
    first = probe.output_token_ids.index(stop_on)

    def make(rid: str, eos: list[int] | None = None, **params: object) -> Request:
        p = SamplingParams(max_tokens=10, detokenize=False, **params)  # type: ignore[arg-type]
        return Request(rid, [1, 2, 3], p, eos_token_ids=eos, tokenizer=tok)

    by_id = make("id", stop_token_ids=[stop_on])
    by_eos = make("eos", eos=[stop_on])
    ignored = make("ignored", eos=[stop_on], ignore_eos=True)
    sched = scheduler()
    for r in (by_id, by_eos, ignored):
        sched.add_request(r)
    run(sched, model, pipelined)
    assert by_id.finish_reason is FinishReason.STOP and by_id.stop_reason == stop_on
    assert by_id.output_token_ids == probe.output_token_ids[: first + 1]
    assert by_eos.finish_reason is FinishReason.STOP and by_eos.stop_reason is None
    assert by_eos.output_token_ids == by_id.output_token_ids
    assert ignored.finish_reason is FinishReason.LENGTH
    assert ignored.output_token_ids == probe.output_token_ids
    assert all(r.detokenizer is None and r.output_text == "" for r in (by_id, by_eos, ignored))


def test_logprobs_work_without_text() -> None:
    tok = byte_tokenizer()
    r = Request(
        "a", [1, 2], SamplingParams(max_tokens=2, logprobs=1, detokenize=False), tokenizer=tok
    )
    sched = scheduler()
    sched.add_request(r)
    for token in (7, 9):
        out = sched.schedule()
        lp = HostLogprobs(sampled=[-0.5], top_ids=[[token, 3]], top_values=[[-0.5, -1.0]])
        sched.update(out, [token], lp)
    assert r.is_finished and r.output_token_ids == [7, 9] and r.output_text == ""
    assert r.output_logprobs is not None
    assert [(e.token_id, e.logprob, e.top) for e in r.output_logprobs] == [
        (7, -0.5, ((7, -0.5),)),
        (9, -0.5, ((9, -0.5),)),
    ]
    out = RequestOutput.from_request(r)
    assert out.text == "" and out.outputs[0].logprobs == r.output_logprobs


def test_llm_generate_without_text(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", vocab_size=300)  # room for the byte-level fallback
    batch = prompts(3)
    opts = dict(dtype="float32", device="cpu", max_model_len=128, max_num_seqs=4)
    with LLM(str(tmp_path / "m"), kv_page_size=64 * 1024, **opts) as llm:  # type: ignore[arg-type]
        assert llm.tokenizer is not None  # so text would be produced
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        with_text = llm.generate(batch, params, use_tqdm=False)
        off = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
        ids_only = llm.generate(batch, off, use_tqdm=False)
    assert [o.token_ids for o in ids_only] == [o.token_ids for o in with_text]
    assert all(o.text == "" for o in ids_only)
    assert any(o.text for o in with_text)


def _same(a: SamplingMetadata, b: SamplingMetadata) -> None:
    assert (a.num_rows, a.all_greedy, a.max_top_k, a.num_logprobs) == (
        b.num_rows,
        b.all_greedy,
        b.max_top_k,
        b.num_logprobs,
    )
    for name in ("greedy", "temperature", "top_k", "top_p", "min_p"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y), name
    assert a.generators.keys() == b.generators.keys()


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0)] * 3,
        [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=1e-6)],
        [SamplingParams(temperature=0), SamplingParams(temperature=0, seed=3)],
        [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5, seed=1)],
        [SamplingParams(temperature=0.9, top_p=0.8, min_p=0.1, logprobs=0)],
    ],
)
def test_for_requests_equals_build(params: list[SamplingParams]) -> None:
    reqs = [Request(f"r{i}", [1, 2], p) for i, p in enumerate(params)]
    fast = SamplingMetadata.for_requests(reqs, "cpu")
    gens = [r.generator("cpu") for r in reqs]
    _same(fast, SamplingMetadata.build(params, gens, "cpu"))
