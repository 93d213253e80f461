"""Structured outputs (guided decoding): a request's output constrained to a JSON schema, any
JSON object, a regular expression, one of a list of strings, or an EBNF grammar (vLLM's
`GuidedDecodingParams`), enforced token by token with the `xgrammar` library.

`xgrammar` is optional (`pip install xgrammar`, or the `structured` extra): nothing here
imports it at module import time; it is imported when a request asks for structured output,
and its absence is an `ImportError` that says how to install it.

How a constrained request runs (see also `LLMEngine.step` and `Sampler`):
- `GuidedDecodingParams` is validated at construction (exactly one kind; the schema, regex or
  grammar parsed by xgrammar, so a bad one is a `ValueError` naming it) and is frozen and
  hashable (a JSON schema is kept as compact JSON text): it is the key of the engine's
  cache of compiled grammars;
- when the engine receives the request, `GrammarBackend` compiles the spec once against the
  engine's tokenizer (a Hugging Face tokenizer, or the byte-level `ByteTokenizer` fallback of
  tiny test models) for the model's vocabulary width, and gives the request its own
  `GuidedState` (an xgrammar `GrammarMatcher`): `n > 1` choices are separate requests, each
  with its own matcher;
- before sampling, the rows of constrained requests get the matcher's token bitmask, applied
  to their logits after penalties and logit bias and before temperature / top-k / top-p, so
  only tokens the grammar accepts can be drawn (`SamplingMetadata.guided`);
- when the scheduler appends a sampled token (`Request.resolve_output`) the matcher accepts
  it; once the matcher is terminated (the grammar is complete and a stop token was accepted,
  or a token was rejected, which the mask rules out) the request finishes with "stop"
  (`stop.check_stop`). A complete grammar allows only the end-of-sequence tokens, which ends
  the request even with `ignore_eos`; `min_tokens` does not ban them for a constrained request
  (the grammar decides when it ends);
- invariant: a request's matcher has accepted exactly its `output_token_ids`, in order. The
  mask of a step needs every earlier token accepted, so with async scheduling the engine
  applies the launched steps before it schedules a step while a constrained request is
  unfinished (unconstrained traffic alone keeps its pipelining). Preemption keeps the output
  tokens, so the matcher needs no rollback;
- unconstrained requests pay one `is None` check per step (`Request.resolve_output`), and
  their batches keep `SamplingMetadata`'s greedy fast path (`SamplingParams.plain_greedy` is
  False for constrained requests).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = "pip install xgrammar (or pip install 'vattention[structured]')"
# Whitespace characters xgrammar lets a JSON output put between two elements: any whitespace
# (as vLLM allows), but bounded, so a model that keeps emitting blanks cannot loop forever.
JSON_MAX_WHITESPACE = 32
GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept per engine (LRU)
KINDS = ("json", "json_object", "regex", "choice", "grammar")


def import_xgrammar() -> Any:
    """The `xgrammar` module, or an `ImportError` that says how to install it."""
    try:
        import xgrammar
    except ImportError as e:
        raise ImportError(
            f"structured outputs (guided_decoding) need the xgrammar package: {INSTALL_HINT}"
        ) from e
    return xgrammar


def _clean(e: BaseException) -> str:
    """xgrammar's error text without its "[time] /path/file.cc:line: " prefix."""
    text = str(e).strip()
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)


@dataclass(frozen=True)
class GuidedDecodingParams:
    """Exactly one constraint on a request's output (vLLM's names and meanings).

    json: a JSON schema (a dict, or its JSON text); the output is one JSON value valid against
        it (xgrammar's strict mode: no properties or items the schema does not list).
    json_object: True for any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    regex: the output fully matches this regular expression.
    choice: the output is exactly one of these strings.
    grammar: an EBNF grammar (xgrammar's / GBNF dialect, start symbol `root`).

    A schema is stored as compact JSON text (`schema()` returns it parsed) and `choice` as a
    tuple, so the params are hashable: equal specs share one compiled grammar.
    """

    json: str | Mapping[str, Any] | bool | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if self.json_object is not False and self.json_object is not True:
            raise TypeError(f"json_object must be a bool, got {type(self.json_object).__name__}")
        if len(given) != 1:
            raise ValueError(
                "guided_decoding needs exactly one of json, json_object, regex, choice, grammar;"
                f" got {', '.join(given) if given else 'none'}"
            )
        if self.json is not None:
            object.__setattr__(self, "json", _schema_text(self.json))
        if self.regex is not None:
            if not isinstance(self.regex, str):
                raise TypeError(f"regex must be a string, got {type(self.regex).__name__}")
            if not self.regex:
                raise ValueError("regex must not be empty")
        if self.choice is not None:
            object.__setattr__(self, "choice", _choices(self.choice))
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise TypeError(f"grammar must be a string, got {type(self.grammar).__name__}")
            if not self.grammar.strip():
                raise ValueError("grammar must not be empty")
        self.build_grammar()  # syntax check: a bad schema, regex or grammar fails here

    @classmethod
    def from_value(cls, value: GuidedDecodingParams | Mapping[str, Any]) -> GuidedDecodingParams:
        """The params themselves, or built from a mapping of their fields."""
        if isinstance(value, GuidedDecodingParams):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - set(KINDS)
            if unknown:
                raise ValueError(
                    f"unknown guided_decoding field(s) {sorted(unknown)}; expected one of {KINDS}"
                )
            return cls(**value)
        raise TypeError(
            f"guided_decoding must be GuidedDecodingParams or a dict, got {type(value).__name__}"
        )

    @property
    def kind(self) -> str:
        """Which constraint this is: one of `KINDS`."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def schema(self) -> Any:
        """The JSON schema, parsed (None unless `kind == "json"`)."""
        return None if self.json is None else json.loads(str(self.json))

    def choice_ebnf(self) -> str:
        """The EBNF grammar of `choice`: `root ::= "a" | "b" | ...`."""
        return "root ::= " + " | ".join(_ebnf_string(c) for c in self.choice or ())

    def build_grammar(self) -> Any:
        """This constraint as a tokenizer-independent `xgrammar.Grammar` (a `ValueError`
        naming the spec when xgrammar cannot parse it)."""
        xgr = import_xgrammar()
        kind = self.kind
        try:
            if kind == "json":
                return xgr.Grammar.from_json_schema(
                    str(self.json), any_whitespace=True, max_whitespace_cnt=JSON_MAX_WHITESPACE
                )
            if kind == "json_object":
                return xgr.Grammar.from_json_schema(
                    '{"type": "object"}', any_whitespace=True, strict_mode=False,
                    max_whitespace_cnt=JSON_MAX_WHITESPACE,
                )  # fmt: skip
            if kind == "regex":
                return xgr.Grammar.from_regex(self.regex)
            if kind == "choice":
                return xgr.Grammar.from_ebnf(self.choice_ebnf())
            return xgr.Grammar.from_ebnf(self.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json": "JSON schema", "json_object": "JSON object grammar"}.get(kind, kind)
            raise ValueError(f"invalid guided_decoding {what}: {_clean(e)}") from None


def _schema_text(schema: Any) -> str:
    """A JSON schema (a dict, a bool or JSON text) as compact JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"invalid guided_decoding JSON schema: not valid JSON ({e})") from None
    if isinstance(schema, Mapping):
        schema = dict(schema)
    elif not isinstance(schema, bool):
        raise TypeError(
            f"a JSON schema must be a dict (or its JSON text), got {type(schema).__name__}"
        )
    try:
        # (keys keep their order: properties are generated in the schema's order)
        return json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid guided_decoding JSON schema: {e}") from None


def _choices(choice: Any) -> tuple[str, ...]:
    if isinstance(choice, (str, bytes)) or not isinstance(choice, Iterable):
        raise TypeError(f"choice must be a list of strings, got {type(choice).__name__}")
    out = tuple(choice)
    if not out:
        raise ValueError("choice must list at least one string")
    for c in out:
        if not isinstance(c, str):
            raise TypeError(f"choice entries must be strings, got {type(c).__name__}")
        if not c:
            raise ValueError("choice entries must not be empty")
    return out


def _ebnf_string(text: str) -> str:
    """`text` as an EBNF string literal (xgrammar's escapes)."""
    escaped = []
    for ch in text:
        if ch in ('"', "\\"):
            escaped.append("\\" + ch)
        elif ch == "\n":
            escaped.append("\\n")
        elif ch == "\r":
            escaped.append("\\r")
        elif ch == "\t":
            escaped.append("\\t")
        elif ord(ch) < 0x20:
            escaped.append(f"\\x{ord(ch):02x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


# -- engine side -----------------------------------------------------------------------------
def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    """xgrammar's view of the engine's tokenizer: every token's bytes, for `vocab_size` (the
    model's logits width) tokens; `stop_token_ids` end the output once the grammar is complete.

    The byte-level `ByteTokenizer` (tiny models without tokenizer files) is built from its
    vocabulary (ids 3..258 are the bytes; the rest are special and never allowed but as stop
    tokens); anything else goes through `xgrammar.TokenizerInfo.from_huggingface`."""
    xgr = import_xgrammar()
    from vattention.models.tokenizer import ByteTokenizer

    stops = sorted(set(stop_token_ids))
    if isinstance(tokenizer, ByteTokenizer):
        vocab = [b""] * vocab_size
        for b in range(256):
            if b + ByteTokenizer.OFFSET < vocab_size:
                vocab[b + ByteTokenizer.OFFSET] = bytes([b])
        return xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops or None
        )
    try:
        return xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops or None
        )
    except Exception as e:  # not a tokenizer xgrammar knows
        raise ValueError(
            f"structured outputs cannot use this tokenizer ({type(tokenizer).__name__}): {e}"
        ) from e


class GuidedState:
    """One request's grammar matcher: accepts its output tokens, fills its bitmask row.

    `guard`: a bitmask row ANDed into every mask of the request (JSON kinds: no token with a
    raw control character but newline, which xgrammar's length-limited JSON strings would let
    through although JSON forbids them; newline it refuses there), or None."""

    __slots__ = ("guard", "matcher", "rejected", "spec")

    def __init__(self, matcher: Any, spec: GuidedDecodingParams, guard: Any = None) -> None:
        self.matcher = matcher
        self.spec = spec
        self.guard = guard
        self.rejected: int | None = None  # a token the grammar refused (the mask rules it out)

    def accept(self, token_id: int) -> None:
        m = self.matcher
        if self.rejected is None and not m.is_terminated() and not m.accept_token(token_id):
            self.rejected = token_id

    @property
    def finished(self) -> bool:
        """The grammar ended (complete, then a stop token), or refused a token."""
        return self.rejected is not None or bool(self.matcher.is_terminated())

    def fill(self, bitmask: Any, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.guard is not None:
            bitmask[row] &= self.guard


class GrammarBackend:
    """The engine's grammar compiler (one per engine, made at its first constrained request)
    and its LRU cache of compiled grammars by spec."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        if tokenizer is None:
            raise ValueError(
                "structured outputs need a tokenizer; this model has none (prompts as token ids)"
            )
        self.xgr = import_xgrammar()
        self.vocab_size = vocab_size
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        self._compiled: OrderedDict[GuidedDecodingParams, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._json_guard: Any = None  # made at the first JSON request

    def json_guard(self) -> Any:
        """The bitmask row (int32, a bit per token) of every token without a raw control
        character but newline: JSON outputs use spaces and newlines as whitespace (tab and
        carriage return, valid JSON whitespace, are refused too: xgrammar would let them into
        length-limited strings)."""
        if self._json_guard is None:
            import numpy as np
            import torch

            bad = set(range(0x20)) - {0x0A}
            vocab = list(self.info.decoded_vocab)[: self.vocab_size]
            words = (self.vocab_size + 31) // 32
            allowed = np.ones(words * 32, dtype=np.uint64)
            for i, token in enumerate(vocab):
                if any(b in bad for b in bytes(token)):
                    allowed[i] = 0
            shifts = np.arange(32, dtype=np.uint64)
            packed = (allowed.reshape(words, 32) << shifts).sum(axis=1, dtype=np.uint64)
            self._json_guard = torch.from_numpy(packed.astype(np.uint32).view(np.int32).copy())
        return self._json_guard

    def compile(self, spec: GuidedDecodingParams) -> Any:
        """The compiled grammar of `spec` (cached; a `ValueError` naming a bad spec)."""
        with self._lock:
            hit = self._compiled.get(spec)
            if hit is not None:
                self._compiled.move_to_end(spec)
                return hit
        try:
            compiled = self.compiler.compile_grammar(spec.build_grammar())
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"cannot compile guided_decoding {spec.kind}: {_clean(e)}") from None
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def state(self, spec: GuidedDecodingParams) -> GuidedState:
        """A new request's matcher, at the grammar's start."""
        guard = self.json_guard() if spec.kind in ("json", "json_object") else None
        return GuidedState(self.xgr.GrammarMatcher(self.compile(spec)), spec, guard)

    @property
    def num_cached(self) -> int:
        return len(self._compiled)


def guided_bitmask(
    states: Sequence[GuidedState | None], vocab_size: int, device: Any
) -> tuple[Any, list[int]]:
    """The token bitmask of a step's sampling rows (`[B, ceil(vocab / 32)]` int32, on
    `device`): each constrained row's allowed tokens (`states[i]`), all tokens elsewhere; and
    the constrained rows."""
    xgr = import_xgrammar()
    rows = [i for i, s in enumerate(states) if s is not None]
    bitmask = xgr.allocate_token_bitmask(len(states), vocab_size)
    for i in rows:
        states[i].fill(bitmask, i)  # type: ignore[union-attr]
    if str(device) != "cpu":
        bitmask = bitmask.pin_memory().to(device, non_blocking=True)
    return bitmask, rows


def apply_bitmask(logits: Any, bitmask: Any, rows: list[int]) -> None:
    """Set the logits of the tokens `bitmask` forbids to -inf, on `rows` only, in place."""
    xgr = import_xgrammar()
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
