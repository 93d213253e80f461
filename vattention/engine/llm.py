"""`LLM`: the offline API in the shape vLLM users know.

    llm = LLM(model="path/to/hf-dir", kv_cache="vattention")
    outputs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outputs[0].outputs[0].text)

Prompts may be strings, token-id lists, or dicts with "prompt" or "prompt_token_ids"; outputs come
back in the order of the prompts. `llm.chat(messages)` renders conversations with the model's
chat template first (as `vattention chat` and the server's `/v1/chat/completions` do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from tqdm.auto import tqdm

from vattention.engine.llm_engine import EngineConfig, LLMEngine
from vattention.engine.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from vattention.engine.pooling import PoolingParams
from vattention.engine.sampling_params import SamplingParams
from vattention.models.tokenizer import template_ids

PromptLike = str | Sequence[int] | dict[str, Any]


class LLM:
    """Load a model once, then `generate` batches of prompts with continuous batching."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        known = {f.name for f in fields(EngineConfig)} - {"model"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown LLM option(s) {unknown}; known: {sorted(known)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling params used where none are given: the built-in defaults with the
        model's recommended values (its generation_config.json; see `EngineConfig`)."""
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for every prompt (`n` per prompt: `outputs[i]` of its
        `RequestOutput`, run as n requests that share the prompt; `prompt_logprobs`, when
        asked for, are the prompt's, computed by its first choice only); returns them in the
        prompts' order. `priority`: one per prompt, with `scheduling_policy="priority"`
        (lower runs first)."""
        items = _as_prompt_list(prompts)
        ranks = [0] * len(items) if priority is None else list(priority)
        if len(ranks) != len(items):
            raise ValueError(f"{len(ranks)} priorities for {len(items)} prompts")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"{len(params)} sampling params for {len(items)} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling params must be SamplingParams, got {p!r}")
        jobs: list[tuple[str | list[int], SamplingParams | PoolingParams, int]] = [
            (item, choice, rank)
            for item, p, rank in zip(items, params, ranks, strict=False)
            for choice in p.choices()
        ]
        outs = self._run(jobs, "generate", use_tqdm)
        groups: list[list[RequestOutput]] = []  # each prompt's requests, one per choice
        at = 0
        for p in params:
            groups.append(outs[at : at + p.n])
            at += p.n
        return [_merge(group) for group in groups]

    def embed(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`engine.pooling`: the last prompt token's final hidden
        state, L2-normalized by default: what embedding checkpoints such as Qwen3-Embedding
        are trained for), in the prompts' order; `.outputs.embedding` holds it."""
        params = PoolingParams() if pooling_params is None else pooling_params
        if not isinstance(params, PoolingParams):
            raise TypeError(f"pooling params must be PoolingParams, got {params!r}")
        jobs: list[tuple[str | list[int], SamplingParams | PoolingParams, int]] = [
            (item, params, 0) for item in _as_prompt_list(prompts)
        ]
        outs = self._run(jobs, "embed", use_tqdm)
        results = []
        for out in outs:
            if out.embedding is None:  # it could not run (e.g. too big for the KV budget)
                reason = out.outputs[0].finish_reason
                raise RuntimeError(
                    f"request {out.request_id} ended without an embedding ({reason})"
                )
            results.append(EmbeddingRequestOutput(
                out.request_id, out.prompt_token_ids, EmbeddingOutput(out.embedding)
            ))  # fmt: skip
        return results

    def _run(
        self, jobs: list[tuple[str | list[int], SamplingParams | PoolingParams, int]], desc: str,
        use_tqdm: bool,
    ) -> list[RequestOutput]:  # fmt: skip
        """Run one engine request per (prompt, params, priority) to the end; their outputs in
        order.
        Nothing of this call is left in the engine if adding a request or a step fails."""
        engine = self.engine
        if engine.has_unfinished_requests():
            raise RuntimeError("the engine still has requests from an interrupted call")
        ids: list[str] = []
        try:
            for item, p, rank in jobs:
                ids.append(engine.add_request(item, p, priority=rank))
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            engine.step()  # collect the aborted requests
            raise
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc=desc, unit="req", disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    done[out.request_id] = out
                    bar.update(1)
        except BaseException:
            # A failed step (device OOM, a kernel error, Ctrl-C): abort this call's requests and
            # drop the launched steps, so the engine stays usable for the next call.
            engine.reset()
            raise
        finally:
            bar.close()
        return [done[rid] for rid in ids]

    def chat(
        self,
        messages: Sequence[dict[str, str]] | Sequence[Sequence[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of `{"role", "content"}` messages) or to each of
        a list of them: each is rendered to token ids with the tokenizer's chat template,
        then generated as `generate` does. `continue_final_message` extends the last
        (assistant) message instead of starting a new one (with `add_generation_prompt`
        False); `chat_template_kwargs` go to the template (e.g. Qwen3's `enable_thinking`)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt=False")
        extra = dict(chat_template_kwargs or {})
        if continue_final_message:
            extra["continue_final_message"] = True
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError(
                f"model {self.engine.config.model!r} has no chat template: use generate()"
            )
        if not messages:
            raise ValueError("chat() needs at least one message")
        one = isinstance(messages[0], dict)
        conversations = [messages] if one else list(messages)
        prompts: list[PromptLike] = []
        for conv in conversations:
            if not conv or not all(isinstance(m, dict) for m in conv):
                raise TypeError("a conversation is a non-empty list of message dicts")
            rendered = tok.apply_chat_template(
                list(conv), tokenize=True, add_generation_prompt=add_generation_prompt, **extra
            )
            prompts.append(template_ids(rendered))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    """One prompt's choices as one output (the first request's id, `outputs[i]` = choice i,
    the first request's `prompt_logprobs`: only choice 0 computes them)."""
    first = outs[0]
    if len(outs) == 1:
        return first
    completions = []
    for i, out in enumerate(outs):
        c = out.outputs[0]
        c.index = i
        completions.append(c)
    first.outputs = completions
    first.num_preemptions = sum(o.num_preemptions for o in outs)
    return first


def _as_prompt_list(prompts: PromptLike | Sequence[PromptLike]) -> list[str | list[int]]:
    items: Sequence[Any]
    if isinstance(prompts, (str, dict)):
        items = [prompts]
    elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
        items = [prompts]  # a single prompt of token ids
    elif isinstance(prompts, Sequence) and prompts:
        items = prompts
    else:
        raise ValueError("generate() needs at least one prompt")
    out: list[str | list[int]] = []
    p: Any
    for p in items:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                p = p["prompt_token_ids"]
            elif "prompt" in p:
                p = p["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Sequence) and all(isinstance(t, int) for t in p):
            out.append(list(p))
        else:
            raise TypeError(
                f"a prompt must be a string or a list of token ids, got {type(p).__name__}"
            )
    return out
