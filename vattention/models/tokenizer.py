"""Tokenizers: a model directory's own (Hugging Face `AutoTokenizer`, local files only) or, for
presets and dummy weights that ship none, the trivial `ByteTokenizer`.

Both offer what the engine uses: `encode`, `decode`, `apply_chat_template` (HF's own template
engine passes through unchanged), `bos_token_id`, `eos_token_id`. `ByteTokenizer` maps UTF-8 bytes
to ids `3..258` (0 = pad, 1 = bos, 2 = eos by default) so text round-trips exactly for any model
whose vocabulary has at least 259 entries; ids it does not know decode to nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vattention.models.presets import PRESETS, get_preset

# any of these makes a directory loadable by AutoTokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


class ByteTokenizer:
    """UTF-8 bytes as tokens: the fallback for models without tokenizer files."""

    OFFSET = 3

    def __init__(
        self, vocab_size: int = 512, bos_token_id: int | None = 1, eos_token_id: int = 2
    ) -> None:
        if vocab_size < 256 + self.OFFSET:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 259, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = 0
        self.chat_template: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        if add_special_tokens and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        **_: Any,
    ) -> str | list[int]:
        """`chat_template` rendered as HF renders one where it is Jinja (given with
        `EngineConfig.chat_template`), else a plain `<|role|>\\ncontent\\n` stand-in."""
        if self.chat_template and ("{%" in self.chat_template or "{{" in self.chat_template):
            extra = {"bos_token": "", "eos_token": "", **_}
            text = render_chat_template(
                self.chat_template, messages, add_generation_prompt, **extra
            )
        else:
            text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
            if add_generation_prompt:
                text += "<|assistant|>\n"
        if _.get("continue_final_message") and messages:  # as HF: cut after the last message
            final = str(messages[-1]["content"]).strip()
            if final not in text:
                raise ValueError("continue_final_message: the final message is not in the chat")
            text = text[: text.rindex(final) + len(final)]
        return self.encode(text) if tokenize else text


def load_tokenizer(path_or_preset: str | Path, fallback: bool = False) -> Any:
    """The tokenizer of a local model directory (never downloads).

    Without tokenizer files (or for a preset name) this raises FileNotFoundError, unless
    `fallback=True`, which returns a `ByteTokenizer` sized to the model's vocabulary.
    """
    path = Path(path_or_preset)
    if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {e}") from e
    if fallback:
        return _fallback_for(path_or_preset)
    where = "preset" if str(path_or_preset).lower() in PRESETS else "directory"
    raise FileNotFoundError(
        f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) for {where} {str(path)!r}; "
        "pass fallback=True for a ByteTokenizer"
    )


def _fallback_for(path_or_preset: str | Path) -> ByteTokenizer:
    from vattention.models.config import ModelConfig

    path = Path(path_or_preset)
    if (path / "config.json").is_file():
        config = ModelConfig.from_pretrained(path)
    else:
        config = get_preset(str(path_or_preset))
    eos = config.eos_token_ids[0] if config.eos_token_ids else 2
    return ByteTokenizer(config.vocab_size, config.bos_token_id, eos)


def template_ids(rendered: Any) -> list[int]:
    """The token ids `apply_chat_template(tokenize=True)` returned (a list, a list of one list,
    or a BatchEncoding, depending on the tokenizer and transformers' version)."""
    if hasattr(rendered, "keys") and "input_ids" in rendered:
        rendered = rendered["input_ids"]
    if rendered and isinstance(rendered[0], list):
        rendered = rendered[0]
    return [int(t) for t in rendered]


def _jinja_env() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def render_chat_template(
    template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, **extra: Any
) -> str:
    """`template` rendered over `messages` in a sandbox, with the variables HF passes."""
    return str(
        _jinja_env()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    )


def load_chat_template(value: str) -> str:
    """A chat template given as a file path or as the Jinja text itself (vLLM's
    `--chat-template`), checked to parse; a clear ValueError otherwise."""
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif any(c in value for c in "{}%\n"):
        text = value
    else:
        raise ValueError(
            f"chat_template {value!r}: no such file, and not a Jinja template (give a file "
            f"path or the template text)"
        )
    from jinja2 import TemplateSyntaxError

    try:
        _jinja_env().parse(text)
    except TemplateSyntaxError as e:
        raise ValueError(f"chat_template does not parse as Jinja: {e} (line {e.lineno})") from None
    if not text.strip():
        raise ValueError("chat_template is empty")
    return text
