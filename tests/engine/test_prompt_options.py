"""vLLM's `include_stop_str_in_output` and `truncate_prompt_tokens`, offline and on the server."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_helpers import save_tiny

from vattention import LLM, SamplingParams
from vattention.engine.sampling_params import truncate_prompt


def _llm(path: Path) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", max_model_len=64, max_num_seqs=4,
               kv_page_size=65536)  # fmt: skip


def test_truncate_prompt_keeps_the_last_tokens() -> None:
    ids = list(range(10))
    assert truncate_prompt(ids, None, 64) == ids
    assert truncate_prompt(ids, 3, 64) == [7, 8, 9]
    assert truncate_prompt(ids, 20, 64) == ids
    assert truncate_prompt(ids, -1, 5) == [6, 7, 8, 9]  # max_model_len - 1
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be -1 or >= 1"):
        SamplingParams(truncate_prompt_tokens=0)
    with pytest.raises(TypeError, match="include_stop_str_in_output must be a bool"):
        SamplingParams(include_stop_str_in_output=1)  # type: ignore[arg-type]


def test_truncated_prompts_generate_as_their_tail(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", vocab_size=300)
    long = [5 + i % 200 for i in range(100)]  # longer than max_model_len 64
    greedy = dict(temperature=0, max_tokens=5, ignore_eos=True)
    with _llm(tmp_path / "m") as llm:
        (cut,) = llm.generate([long], SamplingParams(truncate_prompt_tokens=20, **greedy),
                              use_tqdm=False)  # fmt: skip
        (tail,) = llm.generate([long[-20:]], SamplingParams(**greedy), use_tqdm=False)
        (fit,) = llm.generate([long], SamplingParams(truncate_prompt_tokens=-1, **greedy),
                              use_tqdm=False)  # fmt: skip
        with pytest.raises(ValueError, match="leaves no room for output"):
            llm.generate([long], SamplingParams(**greedy), use_tqdm=False)
    assert cut.prompt_token_ids == long[-20:] and cut.token_ids == tail.token_ids
    assert fit.prompt_token_ids == long[-63:]


def test_stop_string_kept_in_the_output_on_request(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", vocab_size=300)
    with _llm(tmp_path / "m") as llm:
        (free,) = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=12,
                                                       ignore_eos=True), use_tqdm=False)  # fmt: skip
        text = free.text
        assert len(text) >= 3
        stop = text[1:3]  # a string the greedy output is sure to contain
        params = dict(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
        (cut,) = llm.generate(["abc"], SamplingParams(**params), use_tqdm=False)
        (kept,) = llm.generate(["abc"], SamplingParams(include_stop_str_in_output=True, **params),
                               use_tqdm=False)  # fmt: skip
    i = text.find(stop)
    assert cut.text == text[:i] and kept.text == text[: i + len(stop)]
    assert cut.outputs[0].stop_reason == stop == kept.outputs[0].stop_reason


def test_allowed_token_ids_restrict_sampling(tmp_path: Path) -> None:
    """Greedy and sampled rows pick only allowed tokens, next to unrestricted rows that keep
    their own tokens; the log-probabilities stay the model's."""
    save_tiny("llama", tmp_path / "m", vocab_size=300)
    allowed = [7, 50, 123]
    batch = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    free = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with _llm(tmp_path / "m") as llm:
        want = llm.generate(batch, free, use_tqdm=False)
        params = [
            SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1,
                           allowed_token_ids=allowed),
            free,
            SamplingParams(temperature=1.0, seed=4, max_tokens=6, ignore_eos=True,
                           allowed_token_ids=allowed),
        ]  # fmt: skip
        outs = llm.generate(batch, params, use_tqdm=False)
        with pytest.raises(ValueError, match="allowed_token_ids token id 999 is outside"):
            llm.generate(batch[:1], SamplingParams(allowed_token_ids=[999]), use_tqdm=False)
    assert set(outs[0].token_ids) <= set(allowed) and set(outs[2].token_ids) <= set(allowed)
    assert outs[1].token_ids == want[1].token_ids
    assert all(lp.logprob <= 0 for lp in outs[0].outputs[0].logprobs)  # the model's, not -inf
    with pytest.raises(ValueError, match="at least one token"):
        SamplingParams(allowed_token_ids=[])


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_bad_words_never_appear(tmp_path: Path, async_scheduling: bool) -> None:
    """A one-token and a two-token bad word taken from the free greedy output: neither appears
    with `bad_words`, async scheduling or not (the two-token one needs the last token known)."""
    save_tiny("llama", tmp_path / "m", vocab_size=300)  # the byte tokenizer: a char a token
    params = dict(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(str(tmp_path / "m"), device="cpu", dtype="float32", max_model_len=64,
             max_num_seqs=4, kv_page_size=65536, async_scheduling=async_scheduling) as llm:  # fmt: skip
        (free,) = llm.generate(["abc"], SamplingParams(**params), use_tqdm=False)
        ids = free.token_ids  # a pair of adjacent one-character tokens (ids 3-258: bytes)
        i = next(i for i in range(len(ids) - 1) if all(35 < t < 130 for t in ids[i : i + 2]))
        pair = llm.tokenizer.decode(ids[i : i + 2])
        single = llm.tokenizer.decode(ids[i : i + 1])  # one token, banned everywhere
        assert len(pair) == 2
        (out,) = llm.generate(["abc"], SamplingParams(bad_words=[pair], **params), use_tqdm=False)
        assert pair not in llm.tokenizer.decode(out.token_ids)
        assert out.token_ids[: i + 1] == ids[: i + 1]  # the same until the ban bites
        (none,) = llm.generate(["abc"], SamplingParams(bad_words=[single], **params),
                               use_tqdm=False)  # fmt: skip
        assert ids[i] not in none.token_ids
        both = llm.generate(["abc", "xyz"], [SamplingParams(bad_words=[pair], **params),
                                             SamplingParams(**params)], use_tqdm=False)  # fmt: skip
        assert both[0].token_ids == out.token_ids  # a neighbour changes nothing
    with pytest.raises(TypeError, match="bad_words must be a sequence of non-empty strings"):
        SamplingParams(bad_words="word")  # type: ignore[arg-type]
