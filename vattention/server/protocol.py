"""Request models of `/v1/completions` and `/v1/chat/completions` (OpenAI's fields, pydantic v2)
and their mapping to `SamplingParams`, and of vLLM's `/tokenize` and `/detokenize`.

Invariants:
- validation is strict (no coercion: `"5"` is not an int, `1` is not a bool, `true` is not a
  number, NaN and infinities are refused) and every failure becomes an `APIError` (400) whose
  `param` names the field (`messages.0.role`, `temperature`, ...); unknown fields are ignored,
  as OpenAI does;
- parameters this server does not implement are accepted at their neutral value only (no
  `suffix`, `best_of` 1, ...); anything else is a 400 naming the parameter
  (`code: "unsupported_parameter"`);
- tool calling (chat): `tools` (type "function", a non-empty name each) go to the chat
  template; messages may carry an assistant's `tool_calls` and `tool` results
  (`tool_call_id`); `tool_choice` (none, required, a named function; "auto" is a 400) is
  turned into a guided-JSON constraint by `tools.py`, which states its rules;
- prompt log-probabilities: a completion with `echo` and `logprobs: k` asks the engine for the
  prompt's (k alternatives), as does vLLM's extra field `prompt_logprobs` (both endpoints, not
  with `stream`); the engine computes the larger k of the two. `max_tokens: 0` is accepted only
  with `echo` (OpenAI's way of scoring a prompt): the engine still samples one token (every
  request does, once its prompt is computed: no extra step), which the response leaves out;
- after validation a completion's `prompt` is a non-empty list of prompts (a batch: OpenAI's
  list of strings or of token-id lists; a single prompt is a batch of one), each a `str` or a
  non-empty `list[int]` of non-negative ids; a chat message's `content` is a `str` (text
  parts joined);
- structured outputs (both endpoints): OpenAI's `response_format` (`text`, `json_object`,
  `json_schema` with `json_schema.schema`; `strict` is accepted, the output always follows the
  schema) or vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (or its
  newer `structured_outputs` object with one of `json`, `json_object`, `regex`, `choice`,
  `grammar`; other keys, such as `backend`, are ignored); at most
  one of them (else a 400 naming the second); a schema, regex or grammar xgrammar cannot
  parse is a 400 naming its field; they become `SamplingParams.guided_decoding`;
- `to_sampling_params()` only builds `SamplingParams`; its own `ValueError`/`TypeError` are
  turned into 400s as well. Context-length checks need the token count and live in the app.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vattention.engine.sampling_params import MAX_N, SamplingParams
from vattention.engine.structured import KINDS, GuidedDecodingParams
from vattention.server import tools as tool_calls
from vattention.server.errors import APIError, bad_request, unsupported

MAX_LOGPROBS = 20  # most top alternatives per token (OpenAI's chat limit; vLLM's default)

_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by both endpoints (OpenAI's, plus vLLM's `top_k`, `min_p`, `ignore_eos`,
    `stop_token_ids`, `skip_special_tokens`, `repetition_penalty`, `min_tokens`)."""

    model_config = _STRICT

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = Field(0, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's extra field
    # structured outputs: OpenAI's response_format, or one of vLLM's guided_* extra fields
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None  # newer vLLM: {"json": ...} and so on
    include_stop_str_in_output: bool = False  # vLLM's
    allowed_token_ids: list[int] | None = None  # vLLM's: the only tokens that may be sampled
    priority: int = 0  # vLLM's: lower runs first (the server's scheduling policy "priority")
    bad_words: list[str] | None = None  # vLLM's: words that may not be generated
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # vLLM's: keep the last k
    # whether `to_sampling_params` took the token limit from the model's defaults (then the
    # limit is capped at the context left, not checked against it: the client asked nothing)
    _default_max_tokens: bool = PrivateAttr(False)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return v
        raise PydanticCustomError("stop_type", "must be a string or a list of strings")

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids(cls, v: Any) -> Any:
        if v is None or (isinstance(v, list) and all(_is_id(t) for t in v)):
            return v
        raise PydanticCustomError("stop_token_ids_type", "must be a list of non-negative ints")

    def check_common(self) -> None:
        """400 for the parameters set to values this server does not implement."""
        if not 1 <= self.n <= MAX_N:
            raise bad_request(f"n must be in [1, {MAX_N}], got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        if self.prompt_logprobs is not None and self.stream:
            raise bad_request(
                "prompt_logprobs is not available when stream is true", "prompt_logprobs"
            )

    def sampling_kwargs(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """`SamplingParams` keywords of the fields shared by both endpoints; a field the client
        left unset takes the model's default from `defaults` (its generation config), else
        OpenAI's."""
        d = defaults or {}

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else d.get(name, fallback)

        return dict(
            n=self.n,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", -1),
            min_p=pick("min_p", 0.0),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias=_token_bias(self.logit_bias),
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or (),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            min_tokens=self.min_tokens,
            guided_decoding=self.guided_decoding(),
            include_stop_str_in_output=self.include_stop_str_in_output,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=tuple(self.bad_words or ()),
        )

    def guided_decoding(self) -> GuidedDecodingParams | None:
        """The structured-output constraint asked for (None: none), or a 400 naming the field:
        more than one asked, an unknown `response_format`, a bad schema / regex / grammar."""
        asked: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                asked.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise bad_request(
                        "response_format of type json_schema needs 'json_schema': {'name': ...,"
                        " 'schema': {...}} with the schema as an object",
                        "response_format.json_schema",
                    )
                if not isinstance(spec.get("strict", False), (bool, type(None))):
                    raise bad_request(
                        "response_format.json_schema.strict must be a boolean",
                        "response_format.json_schema.strict",
                    )
                asked.append(("response_format", {"json": spec["schema"]}))
            elif kind not in (None, "text"):
                raise bad_request(
                    "response_format.type must be 'text', 'json_object' or 'json_schema', got"
                    f" {kind!r}",
                    "response_format.type",
                )
        for name, key in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, name)
            if value is not None:
                asked.append((name, {key: value}))
        so = self.structured_outputs
        if so is not None:
            fields = {k: v for k, v in so.items() if k in KINDS and v not in (None, False)}
            asked.append(("structured_outputs", fields))
        if not asked:
            return None
        if len(asked) > 1:
            names = [name for name, _ in asked]
            raise bad_request(
                f"only one structured-output constraint may be given, got {', '.join(names)}",
                names[1],
            )
        name, fields = asked[0]
        try:
            return GuidedDecodingParams(**fields)
        except (ValueError, TypeError) as e:
            raise bad_request(f"Invalid {name}: {e}", name) from None
        except ImportError as e:
            raise bad_request(str(e), name, code="unsupported_parameter") from None

    def checked_max_tokens(self, params: SamplingParams) -> int | None:
        """The token limit to check against the context: the client's (None where it came
        from the model's defaults, which the engine caps at the context left instead)."""
        return None if self._default_max_tokens else params.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    """`POST /v1/completions`; `prompt` becomes a batch: a list of prompts, each a `str` or a
    `list[int]` of token ids."""

    prompt: list[str | list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo (the prompt alone)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return _prompt_batch(v)

    def to_sampling_params(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The request's `SamplingParams`; unset fields take `defaults` (the model's)."""
        self.check_common()
        if self.suffix:
            raise unsupported("suffix")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", f"only 1, got {self.best_of}")
        if self.max_tokens == 0:
            if not self.echo:
                raise bad_request(
                    "max_tokens must be >= 1 (0 only with echo, which returns the prompt)",
                    "max_tokens",
                )
            if self.min_tokens:
                raise bad_request("min_tokens must be 0 when max_tokens is 0", "min_tokens")
        prompt_k = [k for k in (self.prompt_logprobs, self.echo_logprobs) if k is not None]
        max_tokens = self.max_tokens
        if "max_tokens" not in self.model_fields_set and defaults and "max_tokens" in defaults:
            max_tokens, self._default_max_tokens = defaults["max_tokens"], True
        return make_sampling_params(
            # max_tokens 0: the engine samples one token anyway; the response leaves it out
            max_tokens=1 if self.prompt_only else max_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=max(prompt_k) if prompt_k else None,
            **self.sampling_kwargs(defaults),
        )

    @property
    def prompt_only(self) -> bool:
        """`echo` with `max_tokens: 0`: the response is the prompt alone (OpenAI's scoring)."""
        return self.echo and self.max_tokens == 0

    @property
    def echo_logprobs(self) -> int | None:
        """Top alternatives of each echoed prompt token (`echo` with `logprobs`), or None."""
        return self.logprobs if self.echo else None


Role = Literal["system", "user", "assistant", "developer", "tool"]


class FunctionCall(BaseModel):
    model_config = _STRICT

    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """A tool call of an earlier assistant message."""

    model_config = _STRICT

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = _STRICT

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: any object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    function: FunctionDefinition


class ChatMessage(BaseModel):
    """One message; `content` is normalized to a string (text parts joined)."""

    model_config = _STRICT

    role: Role
    content: str = ""
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages only
    tool_call_id: str | None = None  # tool messages: required

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("tool_call_id", "a tool message needs 'tool_call_id'")
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls", "only assistant messages have 'tool_calls'")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise PydanticCustomError(
                        "content_part",
                        "only text parts are supported, not {kind}",
                        {"kind": repr(kind)},
                    )
                if not isinstance(part.get("text"), str):
                    raise PydanticCustomError("content_part", "a text part needs a string 'text'")
                texts.append(part["text"])
            return "".join(texts)
        raise PydanticCustomError("content_type", "must be a string or a list of text parts")


class ChatCompletionRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: extend the last (assistant) message
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's, e.g. {"enable_thinking": false}
    _tool_plan: tool_calls.ToolPlan | None = PrivateAttr(None)

    def to_sampling_params(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The request's `SamplingParams`; unset fields take `defaults` (the model's)."""
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        kwargs = self.sampling_kwargs(defaults)
        specs = [(t.function.name, t.function.parameters) for t in self.tools or ()]
        self._tool_plan = tool_calls.plan(specs, self.tool_choice)
        if self._tool_plan is not None:
            if kwargs["guided_decoding"] is not None:
                raise bad_request(
                    "a forced tool_choice (required or a named function) cannot be combined"
                    " with response_format or guided_* constraints",
                    "tool_choice",
                )
            kwargs["guided_decoding"] = self._tool_plan.guided
        max_tokens = self.requested_max_tokens
        if max_tokens is None and defaults and "max_tokens" in defaults:
            max_tokens, self._default_max_tokens = defaults["max_tokens"], True
        return make_sampling_params(
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            **kwargs,
        )

    @property
    def tool_plan(self) -> tool_calls.ToolPlan | None:
        """How the output becomes tool calls (None: plain text); set by `to_sampling_params`."""
        return self._tool_plan

    def template_kwargs(self) -> dict[str, Any]:
        """Keywords of the chat template beyond the messages (`tokenizer.apply_chat_template`):
        `add_generation_prompt`, `continue_final_message`, `tools` and `chat_template_kwargs`
        (which may not set the others); a 400 for the combinations vLLM refuses."""
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request(
                "continue_final_message needs add_generation_prompt set to false",
                "continue_final_message",
            )
        extra = dict(self.chat_template_kwargs or {})
        reserved = {"messages", "tokenize", "add_generation_prompt", "continue_final_message",
                    "tools", "return_dict", "chat_template"} & set(extra)  # fmt: skip
        if reserved:
            raise bad_request(
                f"chat_template_kwargs may not set {sorted(reserved)} (use the request's fields)",
                "chat_template_kwargs",
            )
        out: dict[str, Any] = {"add_generation_prompt": self.add_generation_prompt, **extra}
        if self.continue_final_message:
            out["continue_final_message"] = True
        tools = self.tool_dicts()
        if tools:
            out["tools"] = tools
        return out

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """`tools` as a chat template expects them (Hugging Face's `tools=`), None without."""
        if not self.tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens else self.max_tokens

    def message_dicts(self) -> list[dict[str, Any]]:
        """Messages as a chat template expects them (`developer` is a system message; a tool
        call's `arguments` parsed to an object where they are JSON, as vLLM passes them)."""
        out = []
        for m in self.messages:
            d: dict[str, Any] = {
                "role": "system" if m.role == "developer" else m.role,
                "content": m.content,
            }
            if m.name:
                d["name"] = m.name
            if m.tool_calls:
                d["tool_calls"] = [_template_call(c) for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out


def _template_call(call: MessageToolCall) -> dict[str, Any]:
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    function = {"name": call.function.name, "arguments": arguments}
    return {"id": call.id, "type": "function", "function": function}


class TokenizeCompletionRequest(BaseModel):
    """`POST /tokenize` of a prompt (vLLM's fields)."""

    model_config = _STRICT

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    """`POST /tokenize` of chat messages, rendered as `/v1/chat/completions` renders them."""

    model_config = _STRICT

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False

    def as_chat(self) -> ChatCompletionRequest:
        """The chat request whose prompt these messages are (only its rendering is used)."""
        return ChatCompletionRequest.model_construct(
            model=self.model or "",
            messages=self.messages,
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            chat_template_kwargs=self.chat_template_kwargs,
        )


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


def tokenize_request(body: dict[str, Any]) -> TokenizeRequest:
    """A `/tokenize` body as the chat form (it has `messages`) or the prompt form."""
    if "messages" in body and "prompt" in body:
        raise bad_request("send either 'prompt' or 'messages', not both", "messages")
    if "messages" not in body and "prompt" not in body:
        raise bad_request(
            "send 'prompt' (text) or 'messages' (chat)", "prompt", code="missing_required"
        )
    return validate(TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest, body)


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings` (OpenAI's fields): `input` is one text, one list of token ids, or a
    batch of either."""

    model_config = _STRICT

    model: str
    input: list[str | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # vLLM's: keep the last k

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        return _prompt_batch(v)


class DetokenizeRequest(BaseModel):
    """`POST /detokenize` (vLLM's fields); the ids are checked against the vocabulary later."""

    model_config = _STRICT

    model: str | None = None
    tokens: list[NonNegativeInt]


# -- helpers ---------------------------------------------------------------------------------
def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise bad_request("the request body is empty: expected a JSON object")
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}")
    return obj


def validate(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """`model.model_validate(body)`, its first error as a 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "missing":
        return bad_request(f"'{param}' is a required property", param, code="missing_required")
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return bad_request(f"Invalid value for '{param}': {err['msg']} (got {got})", param)


def make_sampling_params(**kwargs: Any) -> SamplingParams:
    """`SamplingParams(**kwargs)`, its validation errors as 400s naming the parameter."""
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        word = str(e).split(" ", 1)[0]
        raise bad_request(str(e), word if word in kwargs else None) from None


def _token_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's `logit_bias` (token ids as JSON object keys) with int keys; 400 otherwise."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.isdigit():
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        out[int(key)] = value
    return out


MAX_PROMPTS = 256  # most prompts in one /v1/completions request


def _prompt_batch(v: Any) -> list[str | list[int]]:
    """A batch of prompts from a string, a list of token ids, or a list of either."""
    if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
        if len(v) > MAX_PROMPTS:
            raise PydanticCustomError(
                "prompt_batch", "at most {most} prompts per request ({n} given)",
                {"most": MAX_PROMPTS, "n": len(v)},
            )  # fmt: skip
        return [_one_prompt(p) for p in v]
    return [_one_prompt(v)]


def _one_prompt(v: Any) -> str | list[int]:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        if any(t < 0 for t in v):
            raise PydanticCustomError("prompt_ids", "token ids must be non-negative")
        return v
    if isinstance(v, list) and not v:
        raise PydanticCustomError("prompt_empty", "must not be empty")
    raise PydanticCustomError(
        "prompt_type",
        "must be a string, a list of token ids, or a list of strings or of token-id lists",
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_id(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")
