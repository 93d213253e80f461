"""Tool calling on `/v1/chat/completions` without a model-specific parser (as vLLM serves it
without `--enable-auto-tool-choice`): the request's `tools` are rendered into the prompt by the
chat template (Hugging Face's `tools=` argument; a template may ignore them), and a tool call
is forced, never detected, by constraining the output with guided JSON.

`tool_choice`:
- omitted (with or without `tools`) or `"none"`: plain text (the tools are only in the prompt);
- `"auto"` (explicit): a 400: choosing between text and a call needs a parser of the model's
  own tool-call format, which this server does not have;
- `{"type": "function", "function": {"name": N}}`: the output is JSON valid against N's
  `parameters` (missing: any object), returned as one call of N with that text as its
  `arguments`;
- `"required"`: the output is a JSON array (one item or more) of `{"name": ..., "parameters":
  ...}` objects, `anyOf` over the tools (vLLM's schema; each tool's `$defs` moved to its
  root); each item becomes one call.

Invariants:
- `tools` are validated by `protocol.py` (type "function", a non-empty name) and here: names
  unique, a forced call names a given tool, each constraining schema parses (a 400 naming
  `tools.<i>.function.parameters`), no other structured-output constraint alongside;
- a forced choice answers `content: null` and `tool_calls` (ids `call_<hex>`), its
  `finish_reason` "tool_calls" when the grammar completed ("stop" from the engine), the
  engine's reason ("length", "abort") otherwise. A named call cut short keeps its partial
  `arguments`; a `"required"` array cut short cannot be split into calls and is returned as
  `content` (no `tool_calls`);
- streaming: a named call's first delta carries `index`, `id`, `type`, `function.name` and
  its arguments grow as `function.arguments` deltas (their concatenation is the non-streamed
  `arguments`); a `"required"` array is held back and its calls sent whole once it is done;
  then the chunk with `finish_reason`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from vattention.engine.structured import GuidedDecodingParams
from vattention.server.errors import bad_request

ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def check_tools(names: list[str]) -> None:
    """400 unless the tool names are unique (non-empty: checked by the request model)."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise bad_request(f"tool names must be unique: {name!r} is given twice", f"tools.{i}")
        seen.add(name)


def forced_name(tool_choice: Any) -> str | None:
    """The function a `{"type": "function", "function": {"name": ...}}` choice names, None for
    the string choices; a 400 for anything else."""
    if tool_choice is None or tool_choice in ("none", "required"):
        return None
    if tool_choice == "auto":
        raise bad_request(
            'tool_choice "auto" needs a parser of the model\'s own tool-call format, which this'
            ' server does not have (as vLLM without --enable-auto-tool-choice): use "required",'
            ' a named function, or "none" (or leave tool_choice out for a plain-text answer)',
            "tool_choice",
            code="unsupported_parameter",
        )
    if (
        isinstance(tool_choice, dict)
        and tool_choice.get("type") == "function"
        and isinstance(tool_choice.get("function"), dict)
        and isinstance(tool_choice["function"].get("name"), str)
    ):
        return str(tool_choice["function"]["name"])
    raise bad_request(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function":'
        ' {"name": ...}}',
        "tool_choice",
    )


def _guided(schema: dict[str, Any], param: str) -> GuidedDecodingParams:
    try:
        return GuidedDecodingParams(json=schema)
    except (ValueError, TypeError) as e:
        raise bad_request(f"Invalid {param}: {e}", param) from None
    except ImportError as e:
        raise bad_request(str(e), "tool_choice", code="unsupported_parameter") from None


@dataclass
class ToolPlan:
    """How a choice's output becomes tool calls: one named function (`name`) or the
    `"required"` array (`name` None)."""

    name: str | None
    guided: GuidedDecodingParams

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The tool calls in a finished output's text (None: a `"required"` array that does
        not parse, cut short)."""
        if self.name is not None:
            return [_call(self.name, text)]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        if not isinstance(items, list) or not all(
            isinstance(x, dict) and isinstance(x.get("name"), str) for x in items
        ):
            return None
        return [
            _call(x["name"], json.dumps(x.get("parameters", {}), ensure_ascii=False)) for x in items
        ]


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def plan(tools: list[tuple[str, dict[str, Any] | None]], tool_choice: Any) -> ToolPlan | None:
    """The constraint of a forced tool choice over `tools` ((name, parameters) each), or None
    for plain text; the 400s of the module docstring."""
    names = [name for name, _ in tools]
    check_tools(names)
    if tool_choice in (None, "none") or (tool_choice == "auto" and not tools):
        return None  # (nothing to choose from: "auto" without tools is plain text too)
    name = forced_name(tool_choice)
    if not tools:
        raise bad_request(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
    if name is not None:
        if name not in names:
            raise bad_request(
                f"tool_choice names the function {name!r}, which is not among the tools"
                f" ({', '.join(map(repr, names))})",
                "tool_choice",
            )
        i = names.index(name)
        params = tools[i][1]
        param = f"tools.{i}.function.parameters"
        return ToolPlan(name, _guided(ANY_OBJECT if params is None else params, param))
    variants = []
    defs: dict[str, Any] = {}  # each tool's `$defs`, moved to the root (their refs are absolute)
    for i, (tool, params) in enumerate(tools):
        schema = ANY_OBJECT if params is None else params
        param = f"tools.{i}.function.parameters"
        _guided(schema, param)  # each tool's own 400
        if isinstance(schema.get("$defs"), dict):
            schema = dict(schema)
            for key, value in schema.pop("$defs").items():
                if key in defs and defs[key] != value:
                    raise bad_request(
                        f"tools define $defs {key!r} differently: tool_choice 'required' needs"
                        " one schema for every tool",
                        param,
                    )
                defs[key] = value
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [tool]}, "parameters": schema},
                "required": ["name", "parameters"],
            }
        )
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if defs:
        array["$defs"] = defs
    return ToolPlan(None, _guided(array, "tools"))


@dataclass
class ToolStream:
    """A streamed choice's tool calls, as deltas (`ChatRenderer` feeds it the text deltas)."""

    plan: ToolPlan
    text: str = ""
    started: bool = False
    call_id: str = field(default_factory=call_id)

    def deltas(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """The `delta` objects for new output `text` (`finished`: the output is done); a named
        call streams its arguments, the array waits for its end."""
        self.text += text
        if self.plan.name is not None:
            if not text and self.started:
                return []
            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if not self.started:
                self.started = True
                call.update(id=self.call_id, type="function")
                call["function"] = {"name": self.plan.name, "arguments": text}
            return [{"tool_calls": [call]}]
        if not finished:
            return []
        calls = self.plan.calls(self.text)
        if calls is None:
            return [{"content": self.text}] if self.text else []
        return [{"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}]


def finish_reason(reason: str | None, calls: list[dict[str, Any]] | None) -> str | None:
    """A forced choice's `finish_reason`: "tool_calls" where the engine's is "stop" and the
    output held calls."""
    return "tool_calls" if reason == "stop" and calls else reason
