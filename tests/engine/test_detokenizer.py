"""Incremental detokenization (both implementations) and stop-string search."""

from __future__ import annotations

import pytest

from tests.engine.helpers import byte_tokenizer, word_tokenizer
from vattention.engine import detokenizer as detok_mod
from vattention.engine.detokenizer import IncrementalDetokenizer
from vattention.engine.stop import find_stop_string

IMPLS = [
    pytest.param(
        True,
        id="decode-stream",
        marks=pytest.mark.skipif(
            not detok_mod._STREAM_TAKES_IDS, reason="tokenizers cannot seed a DecodeStream"
        ),
    ),
    pytest.param(False, id="window"),
]


@pytest.mark.parametrize("use_stream", IMPLS)
def test_multibyte_characters_appear_only_when_complete(use_stream: bool) -> None:
    tok = byte_tokenizer()
    prompt, text = tok.encode("say: ").ids, "héllo wörld ✓ ok"
    d = IncrementalDetokenizer(tok, prompt, use_stream=use_stream)
    assert d.uses_stream is use_stream
    deltas = [d.push(t) for t in tok.encode(text).ids]
    assert d.text == text and "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)
    assert deltas.count("") == 1 + 1 + 2  # é, ö: 2 bytes; ✓: 3 bytes


@pytest.mark.parametrize("use_stream", IMPLS)
def test_prompt_context_keeps_word_boundaries(use_stream: bool) -> None:
    tok = word_tokenizer()
    assert tok.decode([2]) == "world"  # alone, the leading space is dropped
    d = IncrementalDetokenizer(tok, [1], use_stream=use_stream)
    assert [d.push(t) for t in (2, 4, 3)] == [" world", "!", " big"]


@pytest.mark.parametrize("use_stream", IMPLS)
def test_special_tokens_are_skipped_or_kept(use_stream: bool) -> None:
    tok = word_tokenizer()
    eos = tok.token_to_id("<eos>")
    skip = IncrementalDetokenizer(tok, [1], use_stream=use_stream)
    skip.push(2)
    skip.push(eos)
    assert skip.text == " world"
    keep = IncrementalDetokenizer(tok, [1], skip_special_tokens=False, use_stream=use_stream)
    keep.push(2)
    keep.push(eos)
    assert keep.text.startswith(" world") and "<eos>" in keep.text


def test_hf_tokenizer_wrapper_and_plain_decoders_work() -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer())
    d = IncrementalDetokenizer(tok, tok.encode("a"))
    for t in tok.encode("bé c"):
        d.push(t)
    assert d.text == "bé c" and d.uses_stream is detok_mod._STREAM_TAKES_IDS

    class Plain:  # any object with decode(ids, skip_special_tokens=...)
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(97 + i) for i in ids)

    p = IncrementalDetokenizer(Plain(), [0, 1])
    assert not p.uses_stream and [p.push(t) for t in (2, 3)] == ["c", "d"]
    with pytest.raises(TypeError, match="decode"):
        IncrementalDetokenizer(object(), [1])
    with pytest.raises(ValueError, match="use_stream"):
        IncrementalDetokenizer(Plain(), [1], use_stream=True)


def test_find_stop_string() -> None:
    assert find_stop_string("hello world", 5, ["lo w"]) == (3, "lo w")
    assert find_stop_string("hello world", 4, ["lo w"]) is None  # ended before the new text
    assert find_stop_string("abcabc", 2, ["c", "bc"]) == (4, "bc")  # earliest start wins
    assert find_stop_string("abc", 0, ["c"]) is None
    assert find_stop_string("abc", 3, []) is None
