"""Response bodies of the completion endpoints, in OpenAI's shapes: whole responses, SSE
chunks (`data: {...}\\n\\n`, then `data: [DONE]\\n\\n`), usage, logprobs, finish reasons.

Invariants: a renderer belongs to one request and is fed that request's cumulative outputs in
order; the text deltas it emits concatenate to the final text (the engine's streaming text only
grows: what could still become a stop string is held back); logprob entries are emitted once
each, in order; `finish_reason` is one of "stop", "length" (also for an engine "kv memory"
end: the request ran out of room) and "abort"; log-probabilities are finite JSON numbers.
"""

from __future__ import annotations

import json
import time
from typing import Any

from vattention.engine.logprobs import TokenLogprobs
from vattention.engine.outputs import RequestOutput

DONE = b"data: [DONE]\n\n"
FINISH_REASONS = {"stop": "stop", "length": "length", "kv memory": "length", "abort": "abort"}
MIN_LOGPROB = -9999.0  # -inf is not JSON


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def finish_reason(out: RequestOutput) -> str | None:
    reason = out.outputs[0].finish_reason if out.finished else None
    return None if reason is None else FINISH_REASONS.get(reason, reason)


def usage(outs: list[RequestOutput], prompt_tokens: int) -> dict[str, int]:
    """Token counts of a response's choices: `prompt_tokens` (each prompt counted once) and
    every choice's completion."""
    completion = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def merge_responses(
    bodies: list[dict[str, Any]], outs: list[RequestOutput], prompt_tokens: int
) -> dict[str, Any]:
    """The response: every choice's body (`response()`: one choice each) merged, and usage."""
    merged = dict(bodies[0])
    merged["choices"] = [c for b in bodies for c in b["choices"]]
    merged["usage"] = usage(outs, prompt_tokens)
    return merged


class _Renderer:
    """Delta bookkeeping shared by both endpoints."""

    object_name = ""
    chunk_object_name = ""

    def __init__(
        self, request_id: str, model: str, tokenizer: Any, logprobs: int | None, index: int = 0
    ) -> None:
        self.index = index  # the choice this renderer writes (n > 1: one renderer per choice)
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self._text_len = 0
        self._num_logprobs = 0
        self._text_offset = 0

    def _header(self, obj: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def _delta(self, out: RequestOutput) -> tuple[str, list[TokenLogprobs]]:
        """The text and logprob entries that `out` adds to what was emitted."""
        text = out.outputs[0].text
        delta = text[self._text_len :] if len(text) > self._text_len else ""
        self._text_len = max(self._text_len, len(text))
        entries: list[TokenLogprobs] = []
        if self.logprobs is not None and out.outputs[0].logprobs is not None:
            entries = out.outputs[0].logprobs[self._num_logprobs :]
            self._num_logprobs += len(entries)
        return delta, entries

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def usage_chunk(self, outs: list[RequestOutput], prompt_tokens: int) -> dict[str, Any]:
        body = {**self._header(self.chunk_object_name), "choices": []}
        return {**body, "usage": usage(outs, prompt_tokens)}


class CompletionRenderer(_Renderer):
    """`echo`: the prompt's text, put before the completion's (whole, or as the first chunk)."""

    object_name = chunk_object_name = "text_completion"
    echo: str = ""

    def response(self, out: RequestOutput) -> dict[str, Any]:
        text, entries = self._delta(out)
        text, self.echo = self.echo + text, ""
        return {
            **self._header(self.object_name),
            "choices": [self._choice(text, entries, finish_reason(out))],
        }

    def chunks(self, out: RequestOutput, include_usage: bool) -> list[dict[str, Any]]:
        text, entries = self._delta(out)
        text, self.echo = self.echo + text, ""
        reason = finish_reason(out)
        if not text and not entries and reason is None:
            return []
        chunk = {
            **self._header(self.chunk_object_name),
            "choices": [self._choice(text, entries, reason)],
        }
        if include_usage:
            chunk["usage"] = None
        return [chunk]

    def _choice(
        self, text: str, entries: list[TokenLogprobs], reason: str | None
    ) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": text,
            "logprobs": None if self.logprobs is None else self._logprobs(entries),
            "finish_reason": reason,
        }

    def _logprobs(self, entries: list[TokenLogprobs]) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for e in entries:
            token = self.token_text(e.token_id)
            tokens.append(token)
            values.append(_finite(e.logprob))
            top = {token: _finite(e.logprob)}
            for tid, lp in e.top:
                top.setdefault(self.token_text(tid), _finite(lp))
            tops.append(top)
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


class ChatRenderer(_Renderer):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def response(self, out: RequestOutput) -> dict[str, Any]:
        text, entries = self._delta(out)
        choice = {
            "index": self.index,
            "message": {"role": "assistant", "content": text},
            "logprobs": self._logprobs(entries),
            "finish_reason": finish_reason(out),
        }
        return {**self._header(self.object_name), "choices": [choice]}

    def role_chunk(self, include_usage: bool) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, [], None, include_usage)

    def chunks(self, out: RequestOutput, include_usage: bool) -> list[dict[str, Any]]:
        text, entries = self._delta(out)
        reason = finish_reason(out)
        if not text and not entries and reason is None:
            return []
        return [self._chunk({"content": text} if text else {}, entries, reason, include_usage)]

    def _chunk(
        self, delta: dict[str, Any], entries: list[TokenLogprobs], reason: str | None,
        include_usage: bool,
    ) -> dict[str, Any]:  # fmt: skip
        choice = {
            "index": self.index,
            "delta": delta,
            "logprobs": self._logprobs(entries),
            "finish_reason": reason,
        }
        chunk = {**self._header(self.chunk_object_name), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, entries: list[TokenLogprobs]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        return {"content": [self._entry(e) for e in entries]}

    def _entry(self, e: TokenLogprobs) -> dict[str, Any]:
        token = self.token_text(e.token_id)
        top = [
            {"token": (t := self.token_text(tid)), "logprob": _finite(lp), "bytes": _bytes(t)}
            for tid, lp in e.top
        ]
        return {
            "token": token,
            "logprob": _finite(e.logprob),
            "bytes": _bytes(token),
            "top_logprobs": top,
        }


def _finite(x: float) -> float:
    return x if x > MIN_LOGPROB else MIN_LOGPROB  # also maps NaN to MIN_LOGPROB


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))
