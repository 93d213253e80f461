"""Sampling defaults from the model's generation_config.json (`EngineConfig.generation_config`,
vLLM's `--generation-config`): used by `LLM.generate` without params and by server requests for
the fields they leave unset; "none" keeps the built-in defaults; bad files fail at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llm_helpers import save_tiny

from vattention import LLM, SamplingParams
from vattention.models.generation_config import sampling_defaults
from vattention.server.protocol import ChatCompletionRequest, CompletionRequest

RECOMMENDED = {"temperature": 0.0, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1,
               "max_new_tokens": 5, "do_sample": True, "bos_token_id": 1}  # fmt: skip


def _write(directory: Path, data: object) -> None:
    (directory / "generation_config.json").write_text(json.dumps(data), encoding="utf-8")


def test_sampling_defaults_read_only_the_sampling_keys(tmp_path: Path) -> None:
    assert sampling_defaults(tmp_path) == {}  # no file: no defaults
    _write(tmp_path, RECOMMENDED)
    want = {"temperature": 0.0, "top_p": 0.9, "top_k": -1, "repetition_penalty": 1.1,
            "max_tokens": 5}  # fmt: skip
    assert sampling_defaults(tmp_path) == want
    assert sampling_defaults(tmp_path / "generation_config.json") == want
    _write(tmp_path, {"temperature": "hot"})
    with pytest.raises(ValueError, match="temperature must be a number"):
        sampling_defaults(tmp_path)
    _write(tmp_path, {"max_new_tokens": 2.5})
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        sampling_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{nope", encoding="utf-8")
    with pytest.raises(ValueError, match="not readable JSON"):
        sampling_defaults(tmp_path)


def _llm(path: Path, **kw: object) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", max_model_len=128, max_num_seqs=4,
               kv_page_size=65536, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_generate_without_params_uses_the_models_defaults(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", vocab_size=300)
    _write(tmp_path / "m", {"temperature": 0.0, "max_new_tokens": 5, "repetition_penalty": 1.3})
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    with _llm(tmp_path / "m") as llm:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.max_tokens) == (0.0, 5)
        assert defaults.repetition_penalty == 1.3
        got = llm.generate(prompts, use_tqdm=False)
        want = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5,
                                                    repetition_penalty=1.3), use_tqdm=False)  # fmt: skip
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert all(len(o.token_ids) <= 5 for o in got)  # the default limit (or EOS first)
    with _llm(tmp_path / "m", generation_config="none") as llm:
        assert llm.get_default_sampling_params() == SamplingParams()
    other = tmp_path / "other"
    other.mkdir()
    _write(other, {"max_new_tokens": 3})
    with _llm(tmp_path / "m", generation_config=str(other)) as llm:
        assert llm.get_default_sampling_params().max_tokens == 3


def test_bad_generation_config_fails_at_start_up(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", vocab_size=300)
    _write(tmp_path / "m", {"top_p": 1.5})
    with pytest.raises(ValueError, match="generation_config 'auto' gives bad sampling defaults"):
        _llm(tmp_path / "m")
    with pytest.raises(ValueError, match="give 'auto', 'none', or a directory"):
        _llm(tmp_path / "m", generation_config=str(tmp_path / "missing"))


def test_requests_take_defaults_only_for_fields_they_leave_unset() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 7}
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0.5}
    )
    p = chat.to_sampling_params(defaults)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.5, 20, 7)
    assert chat.checked_max_tokens(p) is None  # capped at the context left, not a 400
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
         "max_completion_tokens": 3}
    )  # fmt: skip
    p = chat.to_sampling_params(defaults)
    assert (p.temperature, p.max_tokens) == (0.0, 3) and chat.checked_max_tokens(p) == 3
    comp = CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    p = comp.to_sampling_params(defaults)
    assert (p.temperature, p.top_k, p.max_tokens) == (0.6, 20, 7)
    comp = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "max_tokens": 16})
    assert comp.to_sampling_params(defaults).max_tokens == 16  # the client's, even OpenAI's 16
    plain = CompletionRequest.model_validate({"model": "m", "prompt": "hi"}).to_sampling_params()
    assert (plain.temperature, plain.top_k, plain.max_tokens) == (1.0, -1, 16)


def test_server_requests_follow_the_models_defaults(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from vattention.engine.llm_engine import EngineConfig
    from vattention.server.app import create_app
    from vattention.server.async_engine import AsyncEngine

    save_tiny("llama", tmp_path / "m", vocab_size=300)
    _write(tmp_path / "m", {"temperature": 0.0, "max_new_tokens": 3})
    config = EngineConfig(model=str(tmp_path / "m"), device="cpu", dtype="float32",
                          max_model_len=128, max_num_seqs=4, kv_page_size=65536)  # fmt: skip
    engine = AsyncEngine.from_config(config)
    try:
        client = TestClient(create_app(engine, "tiny"))
        body = {"model": "tiny", "prompt": [[5, 6, 7, 8]], "ignore_eos": True}
        unset = client.post("/v1/completions", json=body).json()
        assert unset["usage"]["completion_tokens"] == 3  # the model's max_new_tokens
        explicit = client.post("/v1/completions", json=body | {"temperature": 0,
                                                               "max_tokens": 3}).json()  # fmt: skip
        assert unset["choices"][0]["text"] == explicit["choices"][0]["text"]  # greedy default
        long = client.post("/v1/completions", json=body | {"prompt": [[5] * 126]}).json()
        assert long["usage"]["completion_tokens"] == 2  # the default is capped, not a 400
    finally:
        engine.shutdown()
