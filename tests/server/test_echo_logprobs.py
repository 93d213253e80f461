"""Prompt log-probabilities through the server: `/v1/completions` with `echo` and `logprobs`
lists the prompt's tokens first (None for the first), then the generated ones, whole or
streamed, for every choice of every prompt; `echo` with `max_tokens: 0` scores the prompt
alone; vLLM's `prompt_logprobs` field on both endpoints. Values equal `LLM.generate`'s."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, Running, idle
from vattention import LLM, SamplingParams
from vattention.engine.outputs import RequestOutput

PROMPT = "Hello, my name is"
NEW = 6
ATOL = 2e-4


def reference(llm: LLM, prompt: Any, k: int, **params: Any) -> RequestOutput:
    opts: dict[str, Any] = dict(temperature=0, max_tokens=NEW, logprobs=k, prompt_logprobs=k)
    opts.update(params)
    return llm.generate([prompt], SamplingParams(**opts), use_tqdm=False)[0]


def token(llm: LLM, tid: int) -> str:
    return str(llm.tokenizer.decode([tid], skip_special_tokens=False))


def expected_logprobs(llm: LLM, ref: RequestOutput, k: int, echo: bool) -> dict[str, Any]:
    """OpenAI's completion logprobs of `ref` (its prompt first with `echo`)."""
    entries: list[Any] = list(ref.prompt_logprobs or []) if echo else []
    ids = list(ref.prompt_token_ids) if echo else []
    gen = ref.outputs[0].logprobs or []
    entries += gen
    ids += [e.token_id for e in gen]
    tokens = [token(llm, t) for t in ids]
    tops: list[dict[str, float] | None] = []
    for t, e in zip(tokens, entries, strict=True):
        if e is None:
            tops.append(None)
            continue
        top = {t: e.logprob}
        for tid, lp in e.top[:k]:
            top.setdefault(token(llm, tid), lp)
        tops.append(top)
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def assert_logprobs_equal(got: Any, want: dict[str, Any]) -> None:
    got = got if isinstance(got, dict) else got.model_dump()
    assert got["tokens"] == want["tokens"]
    assert got["text_offset"] == want["text_offset"]
    for g, w in zip(got["token_logprobs"], want["token_logprobs"], strict=True):
        assert (g is None) == (w is None) and (w is None or g == pytest.approx(w, abs=ATOL))
    for g, w in zip(got["top_logprobs"], want["top_logprobs"], strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.keys() == w.keys() and list(g.values()) == pytest.approx(
                list(w.values()), abs=ATOL
            )


def joined(chunks: list[Any], n: int) -> list[dict[str, Any]]:
    """Each choice's streamed logprobs, concatenated."""
    out: list[dict[str, Any]] = [
        {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for _ in range(n)
    ]
    for c in chunks:
        for ch in c.choices:
            if ch.logprobs is not None:
                for key, values in ch.logprobs.model_dump().items():
                    out[ch.index][key] += values or []
    return out


def test_echo_with_logprobs_lists_the_prompt_first(client: openai.OpenAI, llm: LLM) -> None:
    ref = reference(llm, PROMPT, 2)
    want = expected_logprobs(llm, ref, 2, echo=True)
    assert want["token_logprobs"][0] is None and want["top_logprobs"][0] is None
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0, echo=True, logprobs=2
    )
    (c,) = r.choices
    assert c.text == PROMPT + ref.text
    assert_logprobs_equal(c.logprobs, want)
    assert r.usage is not None and r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0, echo=True, logprobs=2,
            stream=True,
        )
    )  # fmt: skip
    assert "".join(ch.text for c in chunks for ch in c.choices) == c.text
    assert_logprobs_equal(joined(chunks, 1)[0], want)
    # the prompt's entries come in the first chunk, whole
    first = chunks[0].choices[0].logprobs
    assert first is not None and len(first.tokens or []) > len(ref.prompt_token_ids)


def test_max_tokens_zero_with_echo_scores_the_prompt(
    served: Running, client: openai.OpenAI, llm: LLM
) -> None:
    ids = [5, 17, 42, 99, 250, 7]
    ref = reference(llm, ids, 1)
    want = expected_logprobs(llm, ref, 1, echo=True)
    want = {key: v[: len(ids)] for key, v in want.items()}  # the prompt's part only
    shown = llm.tokenizer.decode(ids, skip_special_tokens=False)
    r = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=0, temperature=0, echo=True, logprobs=1
    )
    (c,) = r.choices
    assert c.text == shown and c.finish_reason == "length"
    assert_logprobs_equal(c.logprobs, want)
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=ids, max_tokens=0, temperature=0, echo=True, logprobs=1,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    body = [c for c in chunks if c.choices]
    assert "".join(ch.text for c in body for ch in c.choices) == shown
    assert body[-1].choices[0].finish_reason == "length"
    assert_logprobs_equal(joined(body, 1)[0], want)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 0
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True)
    assert plain.choices[0].text == PROMPT and plain.choices[0].logprobs is None
    assert idle(served.engine)


def test_every_choice_gets_its_prompts_logprobs(client: openai.OpenAI, llm: LLM) -> None:
    """A batch of prompts with n choices each: every choice lists its own prompt's tokens
    (computed once per prompt), whole or streamed."""
    batch: list[Any] = [PROMPT, [5, 17, 42, 99]]
    wants = []
    for p in batch:
        ref = reference(llm, p, 1)
        wants.append({k: v[: len(ref.prompt_token_ids)] for k, v in
                      expected_logprobs(llm, ref, 1, echo=True).items()})  # fmt: skip
    args = dict(model=MODEL, prompt=batch, max_tokens=4, temperature=1.0, seed=3, n=3, echo=True,
                logprobs=1)  # fmt: skip
    r = client.completions.create(**args)  # type: ignore[call-overload]
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        want = wants[c.index // 3]
        got = {k: v[: len(want["tokens"])] for k, v in c.logprobs.model_dump().items()}
        assert_logprobs_equal(got, want)
    streamed = joined(list(client.completions.create(stream=True, **args)), 6)  # type: ignore[call-overload]
    for i, got in enumerate(streamed):
        want = wants[i // 3]
        assert_logprobs_equal({k: v[: len(want["tokens"])] for k, v in got.items()}, want)
        assert len(got["tokens"]) > len(want["tokens"])  # then the choice's own tokens


def _post(served: Running, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(served.base_url + path, json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return json.loads(r.text)  # type: ignore[no-any-return]


def check_vllm_field(llm: LLM, field: Any, ref: RequestOutput, k: int) -> None:
    """vLLM's `prompt_logprobs`: None, then per position the prompt token and its top k."""
    ids = ref.prompt_token_ids
    assert ref.prompt_logprobs is not None
    assert isinstance(field, list) and len(field) == len(ids) and field[0] is None
    for i in range(1, len(ids)):
        e = ref.prompt_logprobs[i]
        assert e is not None
        d = field[i]
        mine = d[str(ids[i])]
        assert mine["logprob"] == pytest.approx(e.logprob, abs=ATOL)
        assert mine["decoded_token"] == token(llm, ids[i])
        tops = [d[str(tid)] for tid, _ in e.top[:k]]
        assert [t["rank"] for t in tops] == list(range(1, k + 1))
        assert [t["logprob"] for t in tops] == pytest.approx([lp for _, lp in e.top[:k]], abs=ATOL)
        assert set(d) == {str(ids[i])} | {str(tid) for tid, _ in e.top[:k]}
        if ids[i] not in [tid for tid, _ in e.top[:k]]:
            assert mine["rank"] is None  # outside the top k: not computed


def test_vllm_prompt_logprobs_field(served: Running, llm: LLM) -> None:
    ref = reference(llm, PROMPT, 3)
    body = _post(served, "/completions", {"prompt": PROMPT, "max_tokens": NEW,
                                          "temperature": 0, "prompt_logprobs": 3})  # fmt: skip
    (c,) = body["choices"]
    assert c["text"] == ref.text and c["logprobs"] is None
    check_vllm_field(llm, c["prompt_logprobs"], ref, 3)
    # with echo and logprobs too: the engine computes the larger k; each gets its own
    both = _post(served, "/completions", {"prompt": PROMPT, "max_tokens": NEW, "temperature": 0,
                                          "prompt_logprobs": 3, "echo": True, "logprobs": 1})  # fmt: skip
    check_vllm_field(llm, both["choices"][0]["prompt_logprobs"], ref, 3)
    assert_logprobs_equal(
        both["choices"][0]["logprobs"], expected_logprobs(llm, reference(llm, PROMPT, 1), 1, True)
    )
    messages = [{"role": "user", "content": "hi there"}]
    ids = list(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    chat_ref = reference(llm, ids, 2)
    chat = _post(served, "/chat/completions", {"messages": messages, "max_tokens": NEW,
                                                "temperature": 0, "prompt_logprobs": 2, "n": 2})  # fmt: skip
    assert [c["message"]["content"] for c in chat["choices"]] == [chat_ref.text] * 2
    check_vllm_field(llm, chat["prompt_logprobs"], chat_ref, 2)  # the response's, as vLLM
    assert "prompt_logprobs" not in chat["choices"][0]


def test_a_choice_waits_for_its_prompts_logprobs() -> None:
    """Streaming: a choice whose output comes before its prompt's first choice has the
    prompt's log-probabilities is held, then rendered with them (and flushed at the end when
    they never come)."""
    import asyncio

    from vattention.engine.logprobs import TokenLogprobs
    from vattention.engine.outputs import CompletionOutput
    from vattention.server.app import _Server
    from vattention.server.render import CompletionRenderer, SharedPrompt

    prompt_lp = [None, TokenLogprobs(2, -1.5, ((7, -0.5),)), TokenLogprobs(3, -2.5, ((3, -2.5),))]

    def output(i: int, with_prompt: bool) -> RequestOutput:
        gen = [TokenLogprobs(9, -0.25, ((9, -0.25),))]
        done = CompletionOutput(0, "x", [9], "length", logprobs=gen)
        return RequestOutput(f"r-{i}", None, [1, 2, 3], [done], finished=True,
                             prompt_logprobs=prompt_lp if with_prompt else None)  # fmt: skip

    async def run(first_arrives: bool) -> list[dict[str, Any]]:
        later = asyncio.Event()

        async def choice0() -> Any:
            await later.wait()
            if first_arrives:
                yield output(0, True)

        async def choice1() -> Any:
            yield output(1, False)
            later.set()

        shared = SharedPrompt()
        renderers = []
        for i in range(2):
            r = CompletionRenderer("cmpl-x", MODEL, None, 1, i)
            r.echo, r.echo_ids, r.prompt = "abc", [1, 2, 3], shared
            renderers.append(r)
        server = _Server(None, MODEL, 1 << 20)  # type: ignore[arg-type]
        streams = [choice0(), choice1()]
        trackers = [server.metrics.tracker() for _ in streams]
        events = server._events(streams, renderers, trackers, False, 3)  # type: ignore[arg-type]
        return [json.loads(e[6:]) async for e in events if e.startswith(b"data: {")]

    chunks = asyncio.run(run(True))
    assert [c["choices"][0]["index"] for c in chunks] == [0, 1]  # choice 1 was held
    for c in chunks:
        lp = c["choices"][0]["logprobs"]
        assert lp["token_logprobs"] == [None, -1.5, -2.5, -0.25]
        assert lp["tokens"] == ["token_id:1", "token_id:2", "token_id:3", "token_id:9"]
        assert lp["top_logprobs"][1] == {"token_id:2": -1.5, "token_id:7": -0.5}
    (alone,) = asyncio.run(run(False))  # choice 0 ends without output: choice 1 still renders
    assert alone["choices"][0]["index"] == 1
    assert alone["choices"][0]["logprobs"]["token_logprobs"] == [None, None, None, -0.25]
