"""`EngineConfig.chat_template` (vLLM's `--chat-template`): a template given as text or as a
file replaces the tokenizer's for `LLM.chat` and the server; a bad one is a clear error at
start-up, before anything is loaded onto the device."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_helpers import save_tiny

from vattention import LLM, SamplingParams
from vattention.cli import build_parser
from vattention.models.tokenizer import load_chat_template

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)
CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_load_chat_template_from_text_or_file(tmp_path: Path) -> None:
    assert load_chat_template(TEMPLATE) == TEMPLATE
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    assert load_chat_template(str(path)) == TEMPLATE
    with pytest.raises(ValueError, match="no such file, and not a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not parse as Jinja"):
        load_chat_template("{% for m in messages %}{{ m }}")  # no endfor
    with pytest.raises(ValueError, match="empty"):
        load_chat_template("\n\n")


@pytest.mark.parametrize("as_file", [False, True])
def test_llm_chat_uses_the_given_template(tmp_path: Path, as_file: bool) -> None:
    save_tiny("llama", tmp_path / "m", vocab_size=300)  # the byte tokenizer, no template
    template = TEMPLATE
    if as_file:
        (tmp_path / "t.jinja").write_text(TEMPLATE, encoding="utf-8")
        template = str(tmp_path / "t.jinja")
    params = SamplingParams(temperature=0, max_tokens=4)
    with LLM(str(tmp_path / "m"), device="cpu", dtype="float32", max_model_len=128,
             max_num_seqs=2, kv_page_size=65536, chat_template=template) as llm:  # fmt: skip
        text = llm.tokenizer.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
        assert text == "[SYSTEM] be brief\n[USER] hi\n[ASSISTANT] "
        (out,) = llm.chat(CONV, params, use_tqdm=False)
        assert out.prompt_token_ids == llm.tokenizer.encode(text)
        (want,) = llm.generate([out.prompt_token_ids], params, use_tqdm=False)
        assert out.token_ids == want.token_ids


def test_a_bad_template_fails_at_start_up(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", vocab_size=300)
    with pytest.raises(ValueError, match="chat_template"):
        LLM(str(tmp_path / "m"), device="cpu", dtype="float32", max_model_len=128,
            kv_page_size=65536, chat_template="{{ unclosed")  # fmt: skip


def test_cli_flag_and_generate_raw_prompts_coexist() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "m", "--chat-template", "t.jinja"])
    assert args.chat_template == "t.jinja"
    args = parser.parse_args(["generate", "hi", "--no-chat-template", "--chat-template", "x.j"])
    assert args.use_chat_template is False and args.chat_template == "x.j"
    args = parser.parse_args(["generate", "hi"])
    assert args.use_chat_template is True and args.chat_template is None


def test_llm_chat_continues_the_final_message_and_passes_template_kwargs(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", vocab_size=300)
    template = TEMPLATE + "{% if note %}(note){% endif %}"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, the"}]
    params = SamplingParams(temperature=0, max_tokens=3)
    with LLM(str(tmp_path / "m"), device="cpu", dtype="float32", max_model_len=128,
             max_num_seqs=2, kv_page_size=65536, chat_template=template) as llm:  # fmt: skip
        (out,) = llm.chat(msgs, params, add_generation_prompt=False, continue_final_message=True,
                          use_tqdm=False)  # fmt: skip
        assert llm.tokenizer.decode(out.prompt_token_ids).endswith("[ASSISTANT] Sure, the")
        (noted,) = llm.chat(msgs[:1], params, chat_template_kwargs={"note": True},
                            use_tqdm=False)  # fmt: skip
        assert llm.tokenizer.decode(noted.prompt_token_ids).endswith("[ASSISTANT] (note)")
        with pytest.raises(ValueError, match="continue_final_message needs"):
            llm.chat(msgs, params, continue_final_message=True, use_tqdm=False)
