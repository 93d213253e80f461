"""What a finished (or streaming) request returns, in the shape vLLM users know.

`RequestOutput.outputs[0]` is the completion; `text` and `token_ids` are shortcuts to it. The text
is "" when the request has no tokenizer or asked for `SamplingParams(detokenize=False)`; the token
ids (and logprobs, stop reasons) are there either way. `prompt_logprobs` (with
`SamplingParams.prompt_logprobs`) belongs to the prompt, not to a completion: aligned with
`prompt_token_ids`, None at position 0 (vLLM's shape); a request aborted before its prompt was
computed has only the positions computed by then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vattention.engine.logprobs import TokenLogprobs
from vattention.engine.request import Request


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "kv memory"; None while running
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestMetrics:
    """When the request arrived and when the host got its first sampled token
    (`time.monotonic()` seconds; `first_token_time` is None until then)."""

    arrival_time: float
    first_token_time: float | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token, once there is one."""
        t = self.first_token_time
        return None if t is None else t - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_preemptions: int = 0
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    embedding: list[float] | None = None  # an embedding request's (`engine.pooling`)
    num_cached_tokens: int | None = None  # prompt tokens from the prefix cache (first admission)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @classmethod
    def from_request(cls, request: Request, prompt: str | None = None) -> RequestOutput:
        reason = request.finish_reason.value if request.finish_reason is not None else None
        prompt_lp = request.prompt_logprobs
        completion = CompletionOutput(
            index=0,
            text=request.output_text if request.is_finished else request.stream_text(),
            token_ids=list(request.output_token_ids),
            finish_reason=reason,
            stop_reason=request.stop_reason,
            logprobs=None if request.output_logprobs is None else list(request.output_logprobs),
        )
        return cls(
            request_id=request.request_id,
            prompt=prompt,
            # A running request's snapshot (streaming: one per step) shares the immutable
            # prompt tuple instead of copying it every step; a finished one gets its own list.
            prompt_token_ids=(
                list(request.prompt_token_ids) if request.is_finished else request.prompt_token_ids  # type: ignore[arg-type]
            ),
            outputs=[completion],
            finished=request.is_finished,
            num_preemptions=request.num_preemptions,
            metrics=RequestMetrics(request.arrival_time, request.first_token_time),
            # Complete (and so never changed again) once a running request has an output to
            # stream: shared like the prompt; a finished one gets its own list.
            prompt_logprobs=(
                None if prompt_lp is None else list(prompt_lp) if request.is_finished else prompt_lp
            ),
            embedding=request.embedding,
            num_cached_tokens=request.num_cached_tokens,
        )


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """What `LLM.embed` returns per prompt (vLLM's shape: `.outputs.embedding`)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
