"""load_tokenizer on a tiny tokenizer built with `tokenizers`, and the ByteTokenizer fallback."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vattention.models import ByteTokenizer, load_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = ["hello world", "the quick brown fox jumps over the lazy dog", "vattention serves"] * 5


@pytest.fixture
def tokenizer_dir(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": TEMPLATE,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_round_trip(tokenizer_dir) -> None:
    tok = load_tokenizer(tokenizer_dir)
    text = "hello world, the lazy fox! ünïcode"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.convert_tokens_to_ids("</s>")


def test_chat_template_passthrough(tokenizer_dir) -> None:
    tok = load_tokenizer(tokenizer_dir)
    messages = [{"role": "user", "content": "hello"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hello</s><|assistant|>"


def test_missing_tokenizer_files(tmp_path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*fallback=True"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="preset 'tiny'"):
        load_tokenizer("tiny")


def test_byte_fallback_for_presets() -> None:
    tok = load_tokenizer("llama-3-8b", fallback=True)
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (128256, 128000, 128001)
    text = "naïve café ✓"
    ids = tok.encode(text)
    assert ids[0] == 128000 and max(ids[1:]) < 259
    assert tok.decode(ids) == text
    assert tok.decode([5000, 72 + 3, 105 + 3, 99999]) == "Hi"  # unknown ids vanish


def test_byte_fallback_chat_template_and_sizes() -> None:
    tok = ByteTokenizer(512)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert isinstance(ids, list) and tok.decode(ids) == text
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        ByteTokenizer(100)
