"""End to end on the CPU: `LLM.generate` greedy output equals Hugging Face's, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_helpers import hf_greedy, prompts, save_tiny

from vattention import LLM, SamplingParams

CACHES = ["vattention", pytest.param("paged", marks=pytest.mark.paged)]
NEW = 24


def _llm(path: Path, kv_cache: str, **kw: object) -> LLM:
    opts: dict[str, object] = dict(
        kv_cache=kv_cache,
        dtype="float32",
        device="cpu",
        max_model_len=128,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        kv_page_size=64 * 1024,
        block_size=16,
    )
    opts.update(kw)
    return LLM(str(path), **opts)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kv_cache", CACHES)
def test_greedy_matches_hf(tmp_path: Path, kind: str, kv_cache: str) -> None:
    hf = save_tiny(kind, tmp_path / kind)
    batch = prompts(6)
    want = [hf_greedy(hf, p, NEW) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    with _llm(tmp_path / kind, kv_cache) as llm:
        outs = llm.generate(batch, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == want
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert [o.prompt_token_ids for o in outs] == batch


@pytest.mark.parametrize("kv_cache", CACHES)
def test_preemption_gives_the_same_outputs(tmp_path: Path, kv_cache: str) -> None:
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(6, seed=3, low=20, high=60)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    with _llm(tmp_path / "m", kv_cache) as llm:
        free = llm.generate(batch, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions == 0
    # A budget of 6 pages of 64 KiB: far less than 4 requests of up to 84 tokens need at once.
    with _llm(tmp_path / "m", kv_cache, kv_cache_memory=6 * 64 * 1024) as llm:
        tight = llm.generate(batch, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in free]
    assert [o.token_ids for o in free][:2] == [hf_greedy(hf, p, NEW) for p in batch[:2]]


def test_generate_accepts_prompt_forms_and_rejects_bad_input(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m")
    params = SamplingParams(temperature=0, max_tokens=3)
    with _llm(tmp_path / "m", "vattention") as llm:
        one = llm.generate([5, 6, 7], params, use_tqdm=False)
        assert len(one) == 1 and len(one[0].token_ids) <= 3
        two = llm.generate(
            [{"prompt_token_ids": [1, 2]}, [3, 4, 5]], [params, params], use_tqdm=False
        )
        assert len(two) == 2
        with pytest.raises(ValueError, match="vocabulary"):
            llm.generate([[1, 2, 10_000]], params, use_tqdm=False)
        with pytest.raises(ValueError, match="sampling params"):
            llm.generate([[1, 2], [3]], [params], use_tqdm=False)
        with pytest.raises(ValueError, match="at least one prompt"):
            llm.generate([], params, use_tqdm=False)
        # The engine is still usable and holds no request after the errors.
        assert not llm.engine.has_unfinished_requests()
        again = llm.generate([[9, 9, 9]], params, use_tqdm=False)
        assert len(again) == 1
    with pytest.raises(TypeError, match="unknown LLM option"):
        LLM(str(tmp_path / "m"), no_such_option=1)
    with pytest.raises(ValueError, match="kv_cache"):
        LLM(str(tmp_path / "m"), kv_cache="nope", device="cpu")
    # A decode-only backend would fail at the first prefill: refused up front.
    with pytest.raises(ValueError, match="decode steps only"):
        LLM(str(tmp_path / "m"), attention_backend="triton_decode", device="cpu")


@pytest.mark.parametrize("kv_cache", CACHES)
@pytest.mark.parametrize("tight", [False, True])
def test_async_scheduling_gives_the_same_outputs(
    tmp_path: Path, kv_cache: str, tight: bool
) -> None:
    """Scheduling step i+1 before step i's tokens are known changes nothing the user sees, also
    when requests stop on a sampled token, sample with seeds, return logprobs, or get
    preempted."""
    save_tiny("llama", tmp_path / "m")
    batch = prompts(6, seed=5, low=40, high=60)
    # The tight runs also create their whole page budget up front (kv_preallocate).
    budget = {"kv_cache_memory": 6 * 64 * 1024, "kv_preallocate": True} if tight else {}
    with _llm(tmp_path / "m", kv_cache, async_scheduling=False, **budget) as llm:
        probe = llm.generate(batch, SamplingParams(temperature=0, max_tokens=NEW), use_tqdm=False)
    stop_on = probe[0].token_ids[NEW // 3]  # a token greedy decoding surely reaches
    params = [
        SamplingParams(temperature=0, max_tokens=NEW, stop_token_ids=[stop_on]),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=NEW, logprobs=2),
        SamplingParams(temperature=0, max_tokens=NEW // 2, ignore_eos=True),
    ] * 2
    results = []
    for mode in (False, True):
        with _llm(tmp_path / "m", kv_cache, async_scheduling=mode, **budget) as llm:
            outs = llm.generate(batch, params, use_tqdm=False)
            results.append(
                [(o.token_ids, o.outputs[0].finish_reason, o.outputs[0].logprobs) for o in outs]
            )
            if tight:
                assert llm.engine.scheduler.num_preemptions > 0
                if kv_cache == "vattention":
                    assert llm.engine.cache.stats().created_bytes == 6 * 64 * 1024
            assert not llm.engine.has_unfinished_requests()
    # Tokens and reasons are equal; log-probabilities up to float noise (a dropped row changes
    # a step's batch, and with it the matmul's summation order).
    assert [r[:2] for r in results[0]] == [r[:2] for r in results[1]]
    for (_, _, sync_lp), (_, _, async_lp) in zip(*results, strict=True):
        assert (sync_lp is None) == (async_lp is None)
        for a, b in zip(sync_lp or [], async_lp or [], strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert results[1][0][1] == "stop" and results[1][0][0][-1] == stop_on


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_max_model_len_ends_at_the_same_length_in_both_modes(
    tmp_path: Path, async_scheduling: bool
) -> None:
    """A request may hold `max_model_len` tokens (prompt + output) whatever the scheduling: its
    last token is not lost to the placeholder still in flight with async scheduling."""
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(3, seed=2, low=20, high=30)
    limit = 40
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    with _llm(tmp_path / "m", "vattention", max_model_len=limit,
              async_scheduling=async_scheduling) as llm:  # fmt: skip
        outs = llm.generate(batch, params, use_tqdm=False)
    for p, o in zip(batch, outs, strict=True):
        assert len(p) + len(o.token_ids) == limit
        assert o.outputs[0].finish_reason == "length"
        assert o.token_ids == hf_greedy(hf, p, limit - len(p))


def test_step_include_running_streams_every_token(tmp_path: Path) -> None:
    """`step(include_running=True)`: each request's outputs grow token by token, in order,
    ending with the finished output (what a streaming server sends)."""
    save_tiny("llama", tmp_path / "m")
    batch = prompts(4, seed=7)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with _llm(tmp_path / "m", "vattention") as llm:
        eng = llm.engine
        final = {o.request_id: o for o in llm.generate(batch, params, use_tqdm=False)}
        ids = [eng.add_request(p, params) for p in batch]
        seen: dict[str, list[list[int]]] = {rid: [] for rid in ids}
        done = set()
        while eng.has_unfinished_requests():
            for out in eng.step(include_running=True):
                assert out.request_id not in done
                seen[out.request_id].append(list(out.token_ids))
                if out.finished:
                    done.add(out.request_id)
    assert done == set(ids)
    for rid, old in zip(ids, final, strict=True):
        snapshots = seen[rid]
        assert snapshots[-1] == final[old].token_ids
        assert [len(s) for s in snapshots] == list(range(1, len(snapshots) + 1))
        assert all(s == snapshots[-1][: len(s)] for s in snapshots)


def test_outputs_carry_arrival_and_first_token_times(tmp_path: Path) -> None:
    """`RequestOutput.metrics`: the first token's time is set once, when the host first gets a
    token, and does not move as later tokens arrive; TTFT is measured from `add_request`."""
    import time

    save_tiny("llama", tmp_path / "m")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with _llm(tmp_path / "m", "vattention") as llm:
        eng = llm.engine
        before = time.monotonic()
        ids = [eng.add_request(p, params) for p in prompts(3, seed=3)]
        first: dict[str, float] = {}
        while eng.has_unfinished_requests():
            for out in eng.step(include_running=True):
                m = out.metrics
                assert m is not None and m.first_token_time is not None
                assert before <= m.arrival_time <= m.first_token_time <= time.monotonic()
                assert first.setdefault(out.request_id, m.first_token_time) == m.first_token_time
                assert m.ttft == m.first_token_time - m.arrival_time
        assert set(first) == set(ids)


def test_reset_after_a_failed_step_leaves_a_clean_engine(tmp_path: Path) -> None:
    """A step that raises (device OOM, a kernel error) is contained by `reset()`: every request
    is aborted, no slot or page stays held, and the engine serves new requests exactly."""
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(4, seed=11)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with _llm(tmp_path / "m", "vattention") as llm:
        eng = llm.engine
        real, calls = eng.runner.execute, [0]

        def flaky(*args: object, **kwargs: object) -> object:
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected step failure")
            return real(*args, **kwargs)

        eng.runner.execute = flaky  # type: ignore[method-assign]
        for p in batch:
            eng.add_request(p, params)
        with pytest.raises(RuntimeError, match="injected"):
            while eng.has_unfinished_requests():
                eng.step()
        aborted = eng.reset()
        assert len(aborted) == len(batch) and not eng.has_unfinished_requests()
        assert eng.cache.num_free_slots == eng.cache.spec.max_slots
        eng.cache.check_integrity()
        outs = llm.generate(batch, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 8) for p in batch]


def test_generate_contains_a_failed_step(tmp_path: Path) -> None:
    """`generate` re-raises a failing step's error, leaves nothing held, and the next call works."""
    hf = save_tiny("llama", tmp_path / "m")
    batch = prompts(3, seed=12)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with _llm(tmp_path / "m", "vattention") as llm:
        real, calls = llm.engine.runner.execute, [0]

        def flaky(*args: object, **kwargs: object) -> object:
            calls[0] += 1
            if calls[0] == 2:
                raise MemoryError("injected device OOM")
            return real(*args, **kwargs)

        llm.engine.runner.execute = flaky  # type: ignore[method-assign]
        with pytest.raises(MemoryError, match="injected"):
            llm.generate(batch, params, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.cache.num_free_slots == llm.engine.cache.spec.max_slots
        outs = llm.generate(batch, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 6) for p in batch]


def test_engine_create_close_cycles_leak_nothing(tmp_path: Path) -> None:
    """Engines created and closed in a loop give back every mapping and file (CPU backend)."""
    import os

    save_tiny("llama", tmp_path / "m")

    def counts() -> tuple[int, int]:
        with open("/proc/self/maps") as f:
            maps = sum(1 for _ in f)
        return maps, len(os.listdir("/proc/self/fd"))

    def cycle() -> None:
        with _llm(tmp_path / "m", "vattention") as llm:
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)

    cycle()  # the first run loads libraries and fills caches
    before = counts()
    for _ in range(12):
        cycle()
    after = counts()
    assert after[1] <= before[1], (before, after)  # no memfd or other file left open
    assert after[0] <= before[0] + 8, (before, after)  # no reserved range left mapped


def test_n_choices_run_as_seeded_requests_over_one_prompt(tmp_path: Path) -> None:
    """`n` completions of one prompt: choice i equals a single request seeded seed + i; greedy
    choices are all the same; the prompt's pages are shared (prefix cache hits)."""
    save_tiny("llama", tmp_path / "m")
    prompt = prompts(1, seed=11, low=40, high=41)[0]
    many = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    with _llm(tmp_path / "m", "vattention") as llm:
        (out,) = llm.generate([prompt], many, use_tqdm=False)
        singles = [
            llm.generate([prompt], SamplingParams(temperature=1.0, seed=5 + i, max_tokens=10,
                                                  ignore_eos=True), use_tqdm=False)[0]
            for i in range(3)
        ]  # fmt: skip
        greedy = llm.generate([prompt], SamplingParams(n=2, temperature=0, max_tokens=6),
                              use_tqdm=False)[0]  # fmt: skip
        assert llm.engine.scheduler.prefix is not None
        assert llm.engine.scheduler.prefix.hit_tokens > 0
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [s.token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds, different draws
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    with pytest.raises(ValueError, match="n must be in"):
        SamplingParams(n=0)


def test_chat_renders_conversations_with_the_template(tmp_path: Path) -> None:
    """`LLM.chat` replies to one conversation or to several, as `generate` does on the ids the
    chat template renders; a tokenizer without a template is a clear error."""
    save_tiny("llama", tmp_path / "m", vocab_size=300)  # the byte tokenizer
    convs = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "what is a page?"}],
    ]
    params = SamplingParams(temperature=0, max_tokens=8)
    with _llm(tmp_path / "m", "vattention") as llm:
        tok = llm.tokenizer
        with pytest.raises(ValueError, match="no chat template"):
            llm.chat(convs[0], params)
        tok.chat_template = "<|role|> lines"  # it renders `<|role|>\ncontent\n` itself
        ids = [list(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True))
               for c in convs]  # fmt: skip
        want = llm.generate(ids, params, use_tqdm=False)
        both = llm.chat(convs, params, use_tqdm=False)
        (one,) = llm.chat(convs[1], params, use_tqdm=False)
        assert [o.token_ids for o in both] == [w.token_ids for w in want]
        assert one.token_ids == want[1].token_ids and both[0].prompt_token_ids == ids[0]
        with pytest.raises(TypeError, match="conversation"):
            llm.chat([convs[0], "hi"], params, use_tqdm=False)  # type: ignore[list-item]


def test_a_sliding_window_caps_max_model_len(tmp_path: Path) -> None:
    """No backend masks by window: within it full attention is the model's, so the engine caps
    `max_model_len` at the window (an explicit longer one is an error), and the outputs stay
    HF's."""
    hf = save_tiny("mistral", tmp_path / "m", sliding_window=64)
    with pytest.raises(ValueError, match="sliding window"):
        _llm(tmp_path / "m", "vattention", max_model_len=128)
    batch = prompts(3, low=10, high=30)
    with _llm(tmp_path / "m", "vattention", max_model_len=None) as llm:
        assert llm.engine.max_model_len == 64
        outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True),
                            use_tqdm=False)  # fmt: skip
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, NEW) for p in batch]


@pytest.mark.parametrize("kv_cache", CACHES)
def test_a_kv_budget_too_small_for_one_token_is_an_error(
    tmp_path: Path, kv_cache: str, caplog: pytest.LogCaptureFixture
) -> None:
    save_tiny("llama", tmp_path / "m")
    with pytest.raises(ValueError, match=r"kv_cache_memory \(1000 bytes\) cannot hold one"):
        _llm(tmp_path / "m", kv_cache, kv_cache_memory=1000)
    with (
        caplog.at_level("WARNING", logger="vattention.engine"),
        _llm(tmp_path / "m", kv_cache, kv_cache_memory=64 * 1024) as llm,
    ):
        assert llm.engine.max_model_len > 0
    assert "fewer than max_model_len" in caplog.text
