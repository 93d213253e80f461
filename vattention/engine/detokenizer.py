"""Incremental detokenization: a request's output text, grown one token at a time.

Invariants: the text after tokens `t1..tn` equals what decoding the prompt's tail plus `t1..tn`
at once gives, minus the prompt tail's own text; a token that ends inside a multi-byte character
adds nothing until the character is complete (no U+FFFD in the text mid-stream); the last few
prompt tokens are decoded as context so that word-boundary spaces come out right.

Two implementations behind one class: `tokenizers.decoders.DecodeStream` (Rust, fast) when the
tokenizer is (or wraps) a `tokenizers.Tokenizer` and the installed `tokenizers` can seed a stream
with prompt ids; otherwise any object with `decode(ids, skip_special_tokens=...)`, decoded over a
sliding window (prefix and read offsets).

The text grows by appending pieces to a list, joined only when `text` is read: `text += piece`
on an attribute copies the whole text per token (quadratic in the output length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - tokenizers is a dependency
    _RustTokenizer = None  # type: ignore[assignment,misc]
    DecodeStream = None  # type: ignore[assignment,misc]

# Prompt tokens decoded as context before the first output token.
PROMPT_CONTEXT = 5


def _stream_takes_ids() -> bool:
    if DecodeStream is None:
        return False
    try:
        DecodeStream(ids=[], skip_special_tokens=True)
    except TypeError:
        return False
    return True


_STREAM_TAKES_IDS = _stream_takes_ids()


def rust_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind `tokenizer` (itself, or a fast HF tokenizer's), or None."""
    if _RustTokenizer is None:
        return None
    if isinstance(tokenizer, _RustTokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, _RustTokenizer) else None


class IncrementalDetokenizer:
    """Output text of one request; `push(token_id)` returns the text that token added."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        *,
        use_stream: bool | None = None,
    ) -> None:
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(
                f"tokenizer must have a decode() method, got {type(tokenizer).__name__}"
            )
        context = list(prompt_token_ids[-PROMPT_CONTEXT:])
        rust = rust_tokenizer(tokenizer)
        if use_stream is None:
            use_stream = rust is not None and _STREAM_TAKES_IDS
        if use_stream and (rust is None or not _STREAM_TAKES_IDS):
            raise ValueError("use_stream needs a tokenizers.Tokenizer and tokenizers >= 0.22")
        self._text = ""
        self._pieces: list[str] = []  # text added since `_text` was last joined
        self._skip = skip_special_tokens
        self._tokenizer = rust if use_stream else tokenizer
        self._stream = (
            DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            if use_stream
            else None
        )
        # Sliding window (fallback): ids[prefix:read] were already turned into text.
        self._ids = context
        self._prefix = 0
        self._read = len(context)

    @property
    def text(self) -> str:
        """The output text so far."""
        if self._pieces:
            self._text += "".join(self._pieces)
            self._pieces.clear()
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._pieces.clear()
        self._text = value

    @property
    def uses_stream(self) -> bool:
        return self._stream is not None

    def push(self, token_id: int) -> str:
        """Add one output token; return the text it completes ("" while a character is partial)."""
        if self._stream is not None:
            delta = self._stream.step(self._tokenizer, token_id) or ""
        else:
            delta = self._window_step(token_id)
        if delta:
            self._pieces.append(delta)
        return delta

    def _window_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        after = decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        del self._ids[: self._prefix]
        self._prefix, self._read = self._read - self._prefix, len(self._ids)
        return after[len(before) :]
