"""Response bodies of the completion endpoints, in OpenAI's shapes: whole responses, SSE
chunks (`data: {...}\\n\\n`, then `data: [DONE]\\n\\n`), usage, logprobs, finish reasons.

Invariants: a renderer belongs to one request and is fed that request's cumulative outputs in
order; the text deltas it emits concatenate to the final text (the engine's streaming text only
grows: what could still become a stop string is held back); logprob entries are emitted once
each, in order; `finish_reason` is one of "stop", "length" (also for an engine "kv memory"
end: the request ran out of room) and "abort"; log-probabilities are finite JSON numbers.

Prompt log-probabilities belong to a prompt: only its first choice's engine request computes
them (`SamplingParams.choices`), and the renderers of its choices share them through one
`SharedPrompt`; a renderer that needs them does not render before they are known (`ready`).
With `echo` and `logprobs` a completion's `logprobs` lists the prompt's tokens first (the
first with None for its log-probability and its top alternatives, as OpenAI and vLLM do), then
the generated ones, `text_offset` running over both. vLLM's `prompt_logprobs` field is a list
aligned with the prompt, None first, then `{token id: {logprob, rank, decoded_token}}` of the
prompt token and its top alternatives (`rank` is None for a prompt token outside them).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from vattention.engine.logprobs import TokenLogprobs
from vattention.engine.outputs import RequestOutput
from vattention.server import tools

DONE = b"data: [DONE]\n\n"
FINISH_REASONS = {"stop": "stop", "length": "length", "kv memory": "length", "abort": "abort"}
MIN_LOGPROB = -9999.0  # -inf is not JSON


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def finish_reason(out: RequestOutput) -> str | None:
    reason = out.outputs[0].finish_reason if out.finished else None
    return None if reason is None else FINISH_REASONS.get(reason, reason)


def usage(outs: list[RequestOutput], prompt_tokens: int, n: int = 1) -> dict[str, Any]:
    """Token counts of a response's choices (`n` per prompt, in prompt order): `prompt_tokens`
    (each prompt counted once), every choice's completion, and in `prompt_tokens_details` the
    prompt tokens the prefix cache served (OpenAI's `cached_tokens`: each prompt's first
    choice, the one that computed or found its pages)."""
    completion = sum(len(o.outputs[0].token_ids) for o in outs)
    cached = sum(o.num_cached_tokens or 0 for o in outs[:: max(1, n)])
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def prompt_only(out: RequestOutput) -> RequestOutput:
    """`out` without its generated tokens (`echo` with `max_tokens: 0`: the engine sampled one
    token, which the response leaves out); it ended for length unless it was aborted."""
    c = out.outputs[0]
    reason = c.finish_reason
    if reason is not None and reason != "abort":
        reason = "length"
    completion = dataclasses.replace(
        c, text="", token_ids=[], finish_reason=reason, stop_reason=None,
        logprobs=None if c.logprobs is None else [],
    )  # fmt: skip
    return dataclasses.replace(out, outputs=[completion])


@dataclasses.dataclass
class SharedPrompt:
    """One prompt's log-probabilities, as its first choice's output brings them (`ready`)."""

    logprobs: list[TokenLogprobs | None] | None = None


def merge_responses(
    bodies: list[dict[str, Any]], outs: list[RequestOutput], prompt_tokens: int, n: int = 1
) -> dict[str, Any]:
    """The response: every choice's body (`response()`: one choice each) merged, and usage."""
    merged = dict(bodies[0])
    merged["choices"] = [c for b in bodies for c in b["choices"]]
    merged["usage"] = usage(outs, prompt_tokens, n)
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
        # Prompt log-probabilities: where they come from (None: not needed), the top
        # alternatives of vLLM's `prompt_logprobs` field (None: not asked)
        self.prompt: SharedPrompt | None = None
        self.prompt_logprobs: int | None = None

    def ready(self, out: RequestOutput) -> bool:
        """Whether `out` can be rendered: the prompt's log-probabilities are known where they
        are needed (taken from `out` when it carries them: its prompt's first choice)."""
        shared = self.prompt
        if shared is None:
            return True
        mine = out.prompt_logprobs
        if mine is not None and (len(mine) == len(out.prompt_token_ids) or out.finished):
            shared.logprobs = mine
        return shared.logprobs is not None

    def _prompt_entries(self) -> list[TokenLogprobs | None]:
        shared = self.prompt
        return [] if shared is None or shared.logprobs is None else shared.logprobs

    def _prompt_logprobs_field(self) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: per prompt position, None or `{token id: {logprob, rank,
        decoded_token}}` of the prompt token and its top alternatives."""
        k = self.prompt_logprobs or 0
        field: list[dict[str, Any] | None] = []
        for e in self._prompt_entries():
            if e is None:
                field.append(None)
                continue
            top = e.top[:k]
            ranks = {tid: i + 1 for i, (tid, _) in enumerate(top)}
            d = {str(e.token_id): self._vllm_logprob(e.token_id, e.logprob, ranks)}
            for tid, lp in top:
                d.setdefault(str(tid), self._vllm_logprob(tid, lp, ranks))
            field.append(d)
        return field

    def _vllm_logprob(self, token_id: int, logprob: float, ranks: dict[int, int]) -> Any:
        return {
            "logprob": _finite(logprob),
            "rank": ranks.get(token_id),
            "decoded_token": self.token_text(token_id),
        }

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

    def usage_chunk(
        self, outs: list[RequestOutput], prompt_tokens: int, n: int = 1
    ) -> dict[str, Any]:
        body = {**self._header(self.chunk_object_name), "choices": []}
        return {**body, "usage": usage(outs, prompt_tokens, n)}


class CompletionRenderer(_Renderer):
    """`echo`: the prompt's text, put before the completion's (whole, or as the first chunk);
    with `logprobs` also its tokens before the completion's (`echo_ids`, set with `echo`)."""

    object_name = chunk_object_name = "text_completion"
    echo: str = ""
    echo_ids: list[int] | None = None  # the echoed prompt's ids, until rendered

    def response(self, out: RequestOutput) -> dict[str, Any]:
        text, entries = self._delta(out)
        text, self.echo = self.echo + text, ""
        choice = self._choice(text, entries, finish_reason(out))
        if self.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs_field()
        return {**self._header(self.object_name), "choices": [choice]}

    def chunks(self, out: RequestOutput, include_usage: bool) -> list[dict[str, Any]]:
        echoed = self.echo_ids is not None
        text, entries = self._delta(out)
        text, self.echo = self.echo + text, ""
        reason = finish_reason(out)
        if not text and not entries and reason is None and not echoed:
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
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        if self.echo_ids is not None:  # the prompt's tokens, once, before the first output's
            known = self._prompt_entries()
            for i, tid in enumerate(self.echo_ids):
                token = self.token_text(tid)
                e = known[i] if i < len(known) else None
                tokens.append(token)
                values.append(None if e is None else _finite(e.logprob))
                tops.append(None if e is None else self._top(token, e))
                offsets.append(self._text_offset)
                self._text_offset += len(token)
            self.echo_ids = None
        for e in entries:
            token = self.token_text(e.token_id)
            tokens.append(token)
            values.append(_finite(e.logprob))
            tops.append(self._top(token, e))
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _top(self, token: str, e: TokenLogprobs) -> dict[str, float]:
        """The token and its first `logprobs` alternatives (a prompt token's record may hold
        more: the engine computes the larger of `logprobs` and `prompt_logprobs`)."""
        top = {token: _finite(e.logprob)}
        for tid, lp in e.top[: self.logprobs or 0]:
            top.setdefault(self.token_text(tid), _finite(lp))
        return top


class ChatRenderer(_Renderer):
    """`tool_plan`: a forced tool choice, whose output is rendered as `tool_calls` (`tools.py`)."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(
        self, request_id: str, model: str, tokenizer: Any, logprobs: int | None, index: int = 0,
        tool_plan: tools.ToolPlan | None = None,
    ) -> None:  # fmt: skip
        super().__init__(request_id, model, tokenizer, logprobs, index)
        self.tool_stream = None if tool_plan is None else tools.ToolStream(tool_plan)

    def response(self, out: RequestOutput) -> dict[str, Any]:
        text, entries = self._delta(out)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        reason = finish_reason(out)
        if self.tool_stream is not None:
            calls = self.tool_stream.plan.calls(text)
            if calls is not None:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
            reason = tools.finish_reason(reason, calls)
        choice = {
            "index": self.index,
            "message": message,
            "logprobs": self._logprobs(entries),
            "finish_reason": reason,
        }
        body = {**self._header(self.object_name), "choices": [choice]}
        if self.prompt_logprobs is not None:  # vLLM puts a chat's in the response, not a choice
            body["prompt_logprobs"] = self._prompt_logprobs_field()
        return body

    def role_chunk(self, include_usage: bool) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, [], None, include_usage)

    def chunks(self, out: RequestOutput, include_usage: bool) -> list[dict[str, Any]]:
        text, entries = self._delta(out)
        reason = finish_reason(out)
        if self.tool_stream is not None:
            return self._tool_chunks(text, entries, reason, include_usage)
        if not text and not entries and reason is None:
            return []
        return [self._chunk({"content": text} if text else {}, entries, reason, include_usage)]

    def _tool_chunks(
        self, text: str, entries: list[TokenLogprobs], reason: str | None, include_usage: bool
    ) -> list[dict[str, Any]]:
        """A forced tool choice's chunks: its tool-call deltas (the first carrying the logprob
        entries), then, once finished, the chunk with its finish reason."""
        assert self.tool_stream is not None
        deltas = self.tool_stream.deltas(text, reason is not None)
        out = [self._chunk(d, entries if i == 0 else [], None, include_usage)
               for i, d in enumerate(deltas)]  # fmt: skip
        if entries and not deltas:
            out.append(self._chunk({}, entries, None, include_usage))
        if reason is not None:
            calls = self.tool_stream.plan.calls(self.tool_stream.text)
            out.append(self._chunk({}, [], tools.finish_reason(reason, calls), include_usage))
        return out

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
