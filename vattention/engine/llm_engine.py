"""`LLMEngine`: model, KV cache, scheduler, runner and sampler wired together, one step at a time.

A step: `scheduler.schedule()` (backs every row, preempts on `OutOfKVMemory`) ->
`runner.execute()` (launches the forward pass, as a CUDA-graph replay where the step fits one,
and sampling, then hands the cache the next step's lengths: it maps them and maps ahead while
the GPU runs, inline by default or on its background thread until the next `execute` joins it)
-> read the sampled ids of the step before -> `scheduler.update()` of that step (puts the
tokens into their placeholders, applies stop conditions, frees finished slots). The cache's
lock orders the scheduler's own cache calls with the background work, which re-checks slot
ownership piece by piece, so nothing waits for that work but the next `execute`.

With `async_scheduling` (the default) the host thus schedules and launches step i+1 before it
reads step i's tokens, so the GPU never waits for the host's bookkeeping between steps; a
request that ends on a token (EOS, stop) costs one dropped row in the step after. Without it,
each step's tokens are read and applied before the next step is scheduled.

Structured outputs (`SamplingParams.guided_decoding`, `engine.structured`): the engine compiles
a request's grammar when it receives it (a bad spec is a `ValueError` there, and nothing else
changes) and gives the request its own matcher. A step's token bitmask needs every earlier
token of its constrained rows accepted, so while a constrained request is unfinished each
step first applies the launched steps (async scheduling pauses; plain traffic alone keeps it).

Memory: `gpu_memory_utilization` is the share of the device's *total* memory this engine may
use (vLLM's meaning). On CUDA, before the KV cache exists, a start-up profile
(`memory_profile`) runs the largest steps the scheduler can produce on a small temporary cache
and measures their peak; the KV budget is then `total * gpu_memory_utilization - in use (after
the weights; other processes count too) - step peak - CUDA graph reserve - margin`, and the
figures stay on `engine.memory_profile`. `kv_cache_memory` (bytes) overrides all of it, with no
profile; on the CPU the budget is 2 GiB. With `kv_cache="vattention"` that budget caps
*physical* pages only: every slot still gets `max_model_len` tokens of virtual space; on CUDA
its pages are created at start-up (`kv_preallocate`) and mapped only on demand. With
`kv_cache="paged"` it is cut into blocks up front, as vLLM does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vattention.attention import create_backend, get_backend_class
from vattention.engine.cuda_graphs import cascade_sizes, mixed_token_sizes
from vattention.engine.memory_profile import MemoryProfile, profile_memory
from vattention.engine.model_runner import ModelRunner, StepResult, default_graph_sizes
from vattention.engine.outputs import RequestOutput
from vattention.engine.pooling import PoolingParams
from vattention.engine.prefix_cache import sharing_problem
from vattention.engine.request import Request
from vattention.engine.sampler import Sampler
from vattention.engine.sampling_params import SamplingParams, truncate_prompt
from vattention.engine.scheduler import Scheduler
from vattention.engine.scheduling import SchedulerConfig
from vattention.engine.structured import GrammarBackend, GuidedState
from vattention.kvcache.spec import KVCacheSpec, parse_dtype
from vattention.models.generation_config import sampling_defaults
from vattention.models.loader import load_model
from vattention.models.resolve import resolve_model
from vattention.models.tokenizer import load_chat_template, load_tokenizer

KV_CACHES = ("vattention", "paged")
logger = logging.getLogger("vattention.engine")


@dataclass(frozen=True)
class EngineConfig:
    """Everything `LLMEngine` is built from (validated here, with clear errors)."""

    model: str
    kv_cache: str = "vattention"
    dtype: str | None = None
    device: str | None = None
    load_format: str = "auto"
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    # Share of the device's total memory this engine may use (weights, activations, CUDA
    # graphs and KV); the KV cache gets what the start-up memory profile leaves of it.
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; overrides gpu_memory_utilization (no profile)
    attention_backend: str | None = None
    # keyword options of that backend's constructor, e.g. {"cudnn_min_tokens": 8192} for auto
    attention_options: dict[str, Any] | None = None
    block_size: int = 16
    # cross_layer_kv: K and V of every layer in one buffer (16 tokens a 2 MiB page for
    # Llama-3-8B, vLLM's block size): as fast as cross_layer end to end on the H200 and as many
    # requests at a tight budget as the paged cache (benchmarks/results/README.md)
    kv_layout: str = "cross_layer_kv"
    kv_page_size: int | None = None  # bytes; None = the backend's (2 MiB)
    enforce_eager: bool = False
    # CUDA graphs of mixed prefill/decode steps of fewer than this many new tokens (token
    # buckets of powers of two up to it; 0: decode-only graphs), with at most
    # `max_graph_prefills` prefilling requests; larger steps run eagerly.
    mixed_graph_tokens: int = 2048
    max_graph_prefills: int = 16
    async_scheduling: bool = True
    # Create every physical page of the KV budget at start-up (still mapped only on demand), as
    # vLLM allocates its KV memory up front: no page creation (10-20 us each on the H200) on
    # the serving path. None: on CUDA only.
    kv_preallocate: bool | None = None
    # Where the vAttention cache maps the next step's pages: "inline" (on the engine thread,
    # right after the step's launch, while the GPU runs it) or "thread" (a background thread,
    # joined by the next step: it competes with the launching thread for the interpreter).
    kv_mapping: str = "inline"
    # Tokens the vAttention cache maps ahead of each running request's length, beyond what the
    # next step needs (which is always mapped, after the launch). Small, so that mapped memory
    # tracks live tokens; the look-ahead also yields first when memory runs short.
    kv_lookahead_tokens: int = 16
    # Prefix caching: a request whose prompt starts with pages other requests computed reuses
    # them and computes only the rest; full pages are published as requests run. The
    # vAttention cache maps the same physical pages into the new request's contiguous range
    # (zero copy); the paged cache lists the same blocks in its table (vLLM's way).
    # None (default): on wherever the cache can share pages, off otherwise (a vAttention page
    # that splits a token; `LLMEngine.prefix_caching_off_reason` says why); True: required
    # (a clear error where it cannot be); False: off.
    enable_prefix_caching: bool | None = None
    # vAttention cache: a prefix at least this many pages long that two slots map is copied
    # once into one allocation per buffer, which later requests map in one call (the driver's
    # cost is per mapping); None: the cache's default (`virtual.SEGMENT_MIN_PAGES`), 0: never.
    kv_segment_min_pages: int | None = None
    # Cascade decoding (`engine/cascade.py`): in decode-only steps, requests that map the same
    # prefix pages (a system prompt behind prefix caching) have it attended once for all of
    # them instead of once each. Needs a backend with `supports_cascade` (the Triton decode
    # kernel: `auto` on CUDA, `pa_triton`); elsewhere it is ignored. Steps that share nothing
    # run as without it (their own decode graphs).
    cascade_attention: bool = True
    tokenizer: str | None = None
    # A Jinja chat template (the text, or a file holding it) that replaces the tokenizer's own
    # for `LLM.chat`, the server's chat completions and `/tokenize` (vLLM's `--chat-template`).
    chat_template: str | None = None
    # Sampling defaults for parameters a request leaves unset: "auto" (the model directory's
    # generation_config.json, where it has one: vLLM's default), "none" (the built-in
    # defaults), or a directory or file holding a generation_config.json.
    generation_config: str = "auto"
    # "fcfs" (first come, first served) or "priority": requests run by their `priority` (lower
    # first; `LLM.generate(priority=...)`, the server's `priority` field), then arrival, and the
    # lowest-ranked running request yields its slot to a waiting one that outranks it.
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        from vattention.kvcache.virtual import MAPPING_MODES

        if self.kv_mapping not in MAPPING_MODES:
            raise ValueError(f"kv_mapping must be one of {MAPPING_MODES}, got {self.kv_mapping!r}")
        if self.kv_segment_min_pages is not None and self.kv_segment_min_pages < 0:
            raise ValueError(f"kv_segment_min_pages must be >= 0, got {self.kv_segment_min_pages}")
        if self.kv_lookahead_tokens < 0:
            raise ValueError(f"kv_lookahead_tokens must be >= 0, got {self.kv_lookahead_tokens}")
        if self.mixed_graph_tokens < 0 or self.max_graph_prefills < 1:
            raise ValueError(
                f"need mixed_graph_tokens >= 0 and max_graph_prefills >= 1, got "
                f"{self.mixed_graph_tokens} and {self.max_graph_prefills}"
            )


class LLMEngine:
    """Continuous batching over one model; `add_request` then `step()` until idle."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        dtype = parse_dtype(config.dtype) if config.dtype not in (None, "auto") else None
        # GGUF files and built-in names -> a converted, cached HF directory (others unchanged)
        self.model_path = resolve_model(config.model)
        tokenizer_path = resolve_model(config.tokenizer) if config.tokenizer else self.model_path
        self.model = load_model(self.model_path, dtype, device, config.load_format, config.seed)
        mcfg = self.model.config
        self.model_config = mcfg
        max_len = config.max_model_len or mcfg.max_position_embeddings
        if max_len > mcfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                f"{mcfg.max_position_embeddings}"
            )
        window = mcfg.sliding_window
        if window is not None and max_len > window:
            # within the window full causal attention is the model's windowed attention; past
            # it the two differ, and no backend here masks by window
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len {max_len} exceeds the model's sliding window ({window} "
                    f"tokens): windowed attention is not implemented, so longer sequences would "
                    f"not be the model's; use max_model_len <= {window}"
                )
            logger.warning(
                "%s attends through a sliding window of %d tokens, which is not implemented: "
                "max_model_len is capped at %d", config.model, window, window,
            )  # fmt: skip
            max_len = window
        self.max_model_len = max_len
        self.tokenizer: Any = _tokenizer_or_none(tokenizer_path)
        if config.chat_template is not None:
            if self.tokenizer is None:
                raise ValueError(
                    f"chat_template given, but {config.model!r} has no tokenizer to apply it with"
                )
            self.tokenizer.chat_template = load_chat_template(config.chat_template)
        self.sampling_defaults = _sampling_defaults(config.generation_config, self.model_path)
        eos = set(mcfg.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            eos.add(tok_eos)
        self.eos_token_ids = tuple(sorted(eos))
        use_graphs = device.type == "cuda" and not config.enforce_eager
        backend = config.attention_backend or (
            "pa_triton" if config.kv_cache == "paged" else "auto"
        )
        if device.type == "cpu" and config.kv_cache == "paged" and config.attention_backend is None:
            backend = "paged_torch"
        if get_backend_class(backend).decode_only:
            raise ValueError(
                f"attention backend {backend!r} runs decode steps only; the engine also runs "
                f"prefills (use 'auto', which takes it for decode steps)"
            )
        batched = config.max_num_batched_tokens or max(8192, config.max_num_seqs)
        sched_config = SchedulerConfig(
            config.max_num_seqs, max(batched, config.max_num_seqs), max_len,
            enable_prefix_caching=bool(config.enable_prefix_caching),  # resolved below
            policy=config.scheduling_policy,
        )  # fmt: skip
        kv_dtype = next(self.model.parameters()).dtype
        spec = mcfg.kv_cache_spec(
            config.max_num_seqs + (1 if use_graphs else 0), max_len, kv_dtype, config.kv_layout,
            config.kv_page_size,
        )  # fmt: skip
        # What the KV budget was sized from (None: kv_cache_memory was given, or not on CUDA).
        self.memory_profile: MemoryProfile | None = None
        # CUDA graph buckets: decode steps by batch size, mixed steps by token count
        decode_sizes = default_graph_sizes(config.max_num_seqs) if use_graphs else []
        mixed_sizes = (
            mixed_token_sizes(
                sched_config.max_num_batched_tokens, config.max_num_seqs, config.mixed_graph_tokens
            )
            if use_graphs
            else []
        )
        # (the profile's requests must all be computed: no prefix caching there)
        profile_config = dataclasses.replace(sched_config, enable_prefix_caching=False)
        budget = self._kv_budget(config, spec, backend, profile_config, decode_sizes, mixed_sizes)
        self.cache = self._make_cache(config, spec, budget)
        try:
            self.attn = create_backend(
                backend, self.cache, mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim,
                **(config.attention_options or {}),
            )  # fmt: skip
            problem = sharing_problem(self.cache)
            wanted = config.enable_prefix_caching
            if wanted and problem:
                raise ValueError(f"enable_prefix_caching=True, but {problem}")
            share = problem is None and wanted is not False
            self.prefix_caching_off_reason: str | None = (
                None if share else (problem or "enable_prefix_caching=False")
            )
            sched_config = dataclasses.replace(sched_config, enable_prefix_caching=share)
            self.scheduler = Scheduler(sched_config, self.cache)
            dummy = None
            if use_graphs:
                dummy = self.cache.alloc_slot()  # padding rows of CUDA graphs point here
                self.cache.ensure(dummy, 1)
            self.runner = self._make_runner(
                config, device, max_len, dummy, decode_sizes, mixed_sizes
            )
        except BaseException:  # e.g. out of memory capturing graphs: give the cache back
            close = getattr(self.cache, "close", None)
            if close is not None:
                close()
            raise
        # Wall-clock seconds per phase of `step`, summed (for benchmarks; cheap to keep).
        self.timings: dict[str, float] = dict.fromkeys(
            ("join", "schedule", "execute", "sync", "update"), 0.0
        )
        self._inflight: deque[StepResult] = deque()  # launched, not yet updated
        self._ids = itertools.count()
        self._prompts: dict[str, str | None] = {}
        # Structured outputs: the grammar compiler (made at the first constrained request) and
        # the constrained requests not known to be finished (empty: steps pipeline as usual).
        self._grammar: GrammarBackend | None = None
        self._grammar_lock = threading.Lock()  # `grammar_backend` may be called from any thread
        # Requests whose sampling needs every earlier token on the host (structured outputs,
        # multi-token bad words): while one runs, each step first applies the launched ones.
        self._guided: list[Request] = []

    def _make_runner(
        self, config: EngineConfig, device: torch.device, max_len: int, dummy: int | None,
        decode_sizes: list[int], mixed_sizes: list[int],
    ) -> ModelRunner:  # fmt: skip
        return ModelRunner(
            self.model,
            self.cache,
            self.attn,
            Sampler(seed=config.seed),
            device,
            max_len,
            decode_sizes,
            dummy,
            mixed_sizes=mixed_sizes,
            max_num_seqs=config.max_num_seqs,
            max_graph_prefills=config.max_graph_prefills,
            cascade=config.cascade_attention,
        )

    def _kv_budget(
        self, config: EngineConfig, spec: KVCacheSpec, backend: str, sched: SchedulerConfig,
        decode_sizes: list[int], mixed_sizes: list[int],
    ) -> int:  # fmt: skip
        """KV cache bytes: `kv_cache_memory` if given; on CUDA what the start-up memory profile
        leaves of `gpu_memory_utilization` of the device (`memory_profile`); else 2 GiB."""
        if config.kv_cache_memory is not None:
            return config.kv_cache_memory
        if self.device.type != "cuda":
            return 2 << 30
        torch.cuda.synchronize(self.device)
        # cascade decoding's second set of decode graphs keeps its logits too (counted even
        # where the backend turns out not to run it: a little budget, never an overrun)
        cascade = cascade_sizes(decode_sizes) if config.cascade_attention else []
        self.memory_profile = profile_memory(
            self.model, kind=config.kv_cache, spec=spec, device=self.device,
            attention_backend=backend, block_size=config.block_size, scheduler_config=sched,
            utilization=config.gpu_memory_utilization,
            decode_graph_sizes=decode_sizes + cascade, mixed_graph_sizes=mixed_sizes,
        )  # fmt: skip
        return self.memory_profile.kv_budget

    def _make_cache(self, config: EngineConfig, spec: KVCacheSpec, budget: int) -> Any:
        if budget <= 0:
            raise ValueError(f"no memory left for the KV cache (budget {budget} bytes)")
        source = "kv_cache_memory" if config.kv_cache_memory is not None else "the KV budget"

        def too_small(unit: int) -> ValueError:
            return ValueError(
                f"{source} ({budget} bytes) cannot hold one token of this model's KV cache "
                f"(its unit of memory is {unit} bytes): give more memory "
                f"(kv_cache_memory, or a higher gpu_memory_utilization)"
            )

        block = config.block_size * spec.token_bytes
        if config.kv_cache == "paged" and budget < block:  # (the paged cache would refuse it)
            raise too_small(block)
        cache = self._new_cache(config, spec, budget)
        tokens = _budget_tokens(cache, budget)
        if tokens < 1:
            cache.close()
            raise too_small(_unit_bytes(cache))
        if tokens < spec.max_seq_len:
            logger.warning(
                "%s (%d bytes) holds at most %d tokens, fewer than max_model_len %d: a request "
                "longer than that finishes with 'kv memory'", source, budget, tokens,
                spec.max_seq_len,
            )  # fmt: skip
        return cache

    def _new_cache(self, config: EngineConfig, spec: KVCacheSpec, budget: int) -> Any:
        if config.kv_cache == "vattention":
            from vattention.kvcache.virtual import VirtualKVCache

            backend = "cuda" if self.device.type == "cuda" else "cpu"
            cache = VirtualKVCache(
                spec, backend, device=self.device, budget_bytes=budget, mapping=config.kv_mapping,
                lookahead_tokens=config.kv_lookahead_tokens,
                segment_min_pages=config.kv_segment_min_pages,
            )  # fmt: skip
            preallocate = config.kv_preallocate
            if preallocate or (preallocate is None and self.device.type == "cuda"):
                cache.prefill_pool(budget // cache.page_size)
            return cache
        from vattention.kvcache.paged import PagedKVCache

        return PagedKVCache(
            spec, block_size=config.block_size, budget_bytes=budget, device=self.device
        )

    # -- requests ---------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        """`SamplingParams()` with the model's recommended values (`generation_config`)."""
        return SamplingParams(**self.sampling_defaults)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | PoolingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a prompt (text or token ids); returns its request id. One completion per
        request: `LLM.generate` and the server fan `n > 1` out into n requests. With
        `PoolingParams` the request computes the prompt's embedding (`engine.pooling`)."""
        pooling = params if isinstance(params, PoolingParams) else None
        if pooling is not None:
            hidden = self.model_config.hidden_size
            if pooling.dimensions is not None and pooling.dimensions > hidden:
                raise ValueError(
                    f"dimensions {pooling.dimensions} exceeds the model's hidden size {hidden}"
                )
            params = pooling.sampling()
        params = self.default_sampling_params() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise ValueError(
                f"an engine request makes one completion, got n={params.n}: add n requests "
                "with params.choices() (LLM.generate and the server do)"
            )
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            ids = list(self.tokenizer.encode(prompt))
            text: str | None = prompt
        else:
            ids, text = list(prompt), None
        if params.truncate_prompt_tokens is not None:
            ids = truncate_prompt(ids, params.truncate_prompt_tokens, self.max_model_len)
        vocab = self.model_config.vocab_size
        if ids and (max(ids) >= vocab):
            raise ValueError(f"prompt token id {max(ids)} is outside the vocabulary ({vocab})")
        allowed = params.allowed_token_ids
        if allowed and max(allowed) >= vocab:
            raise ValueError(
                f"allowed_token_ids token id {max(allowed)} is outside the vocabulary ({vocab})"
            )
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(
                f"logit_bias token id {max(params.logit_bias)} is outside the vocabulary ({vocab})"
            )
        guided = None if params.guided_decoding is None else self._guided_state(params)
        rid = request_id if request_id is not None else str(next(self._ids))
        request = Request(
            rid, ids, params, eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer,
            pooling=pooling, priority=priority,
        )  # fmt: skip
        request.guided = guided
        if params.bad_words:
            request.bad_word_ids = self._bad_word_ids(params.bad_words)
        self.scheduler.add_request(request)
        if guided is not None or any(len(s) > 1 for s in request.bad_word_ids):
            self._guided.append(request)
        self._prompts[rid] = text
        return rid

    def _bad_word_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each bad word's token sequences, as is and after a space (vLLM's two forms)."""
        if self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer: this model has none")
        seqs: dict[tuple[int, ...], None] = {}
        for word in words:
            for text in (word, " " + word):
                ids = tuple(int(t) for t in self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    seqs[ids] = None
        return tuple(seqs)

    def _guided_state(self, params: SamplingParams) -> GuidedState:
        """A new matcher of `params.guided_decoding`, compiled (once per spec) for this
        engine's tokenizer and vocabulary."""
        assert params.guided_decoding is not None
        return self.grammar_backend().state(params.guided_decoding)

    def grammar_backend(self) -> GrammarBackend:
        """The engine's grammar compiler, made at the first call (safe from any thread: the
        server compiles a request's grammar on a worker thread before queueing it, so a new
        schema does not stall the engine thread and every running request with it)."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarBackend(
                    self.tokenizer, int(self.model_config.vocab_size), self.eos_token_ids
                )
            return self._grammar

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort_request(request_id)

    def reset(self) -> list[str]:
        """Abort every request and drop the launched steps (after a failed step, say), so the
        engine starts clean: every slot is freed, nothing is left in flight. Returns the ids
        of the aborted requests."""
        with contextlib.suppress(Exception):  # the failed step may have left the job broken
            self.runner.join_mapping()
        ids = list(self.scheduler.requests)
        for rid in ids:
            self.scheduler.abort_request(rid)
        self._inflight.clear()
        self.scheduler.drop_pending()
        self._prompts.clear()
        self._guided.clear()
        return ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._inflight)

    # -- one step ---------------------------------------------------------------------------
    def step(self, include_running: bool = False) -> list[RequestOutput]:
        """Schedule and launch one step, then apply the tokens of the oldest launched step that
        is due (this one without `async_scheduling`); returns the requests that finished and,
        with `include_running` (streaming), also those still running that got new tokens
        (`finished=False`, text held back where it could still become a stop string)."""
        clock, t = time.perf_counter, self.timings
        finished: list[Request] = []
        updated: list[Request] = []
        if self._guided:  # the one check plain traffic pays
            self._guided = [r for r in self._guided if not r.is_finished]
            while self._guided and self._inflight:  # masks need the tokens in flight
                finished += self._apply(self._inflight.popleft(), updated)
        t0 = clock()
        out = self.scheduler.schedule()
        t1 = clock()
        t["schedule"] += t1 - t0
        if out.is_empty:  # nothing to launch: apply what is in flight, then this empty step
            while self._inflight:
                finished += self._apply(self._inflight.popleft(), updated)
            finished += self.scheduler.update(out, [])
        else:
            prev = self._inflight[-1] if self._inflight else None
            joined = self.runner.join_seconds
            self._inflight.append(self.runner.execute(out, self._upcoming(), prev))
            t["execute"] += clock() - t1  # includes joining the cache's mapping job:
            t["join"] += self.runner.join_seconds - joined
            if len(self._inflight) > (1 if self.config.async_scheduling else 0):
                finished += self._apply(self._inflight.popleft(), updated)
        outputs = [
            RequestOutput.from_request(r, self._prompts.pop(r.request_id, None)) for r in finished
        ]
        if include_running:
            seen: set[str] = set()
            for r in updated:
                if not r.is_finished and r.request_id not in seen:
                    seen.add(r.request_id)
                    outputs.append(RequestOutput.from_request(r, self._prompts.get(r.request_id)))
        return outputs

    def _apply(self, result: StepResult, updated: list[Request] | None = None) -> list[Request]:
        """Wait for a launched step's sampled ids and hand them to the scheduler; the requests
        its rows sampled for are appended to `updated`."""
        clock, t = time.perf_counter, self.timings
        t0 = clock()
        token_ids = result.token_ids()
        logprobs = result.logprobs()
        prompt_logprobs = result.prompt_logprobs()
        pooled = result.pooled()
        t1 = clock()
        finished = self.scheduler.update(result.out, token_ids, logprobs, prompt_logprobs, pooled)
        t["sync"] += t1 - t0
        t["update"] += clock() - t1
        if updated is not None:
            updated.extend(row.request for row in result.out.sampling)
        return finished

    def _upcoming(self) -> list[int]:
        """Token counts of the waiting requests likely admitted in the next two steps."""
        sched = self.scheduler
        room = sched.config.max_num_seqs - sched.num_running
        budget = 2 * sched.config.max_num_batched_tokens
        counts: list[int] = []
        prefix = sched.prefix
        for r in sched.waiting:
            if len(counts) >= room or budget <= 0:
                break
            if prefix is not None and prefix.likely_hit(r):
                continue  # its slot maps shared pages first: nothing to prepare
            n = min(r.num_tokens, budget)
            counts.append(n)
            budget -= n
        return counts

    def close(self) -> None:
        self._inflight.clear()  # the cache synchronizes the device before it unmaps
        close = getattr(self.cache, "close", None)
        if close is not None:
            self.runner.join_mapping()
            self.runner.graphs = None
            self.runner.mixed_graphs = None
            close()


def _unit_bytes(cache: Any) -> int:
    """Bytes of the smallest piece of memory `cache` hands out: a page per buffer, a block."""
    if hasattr(cache, "block_bytes"):
        return int(cache.block_bytes)
    return int(cache.page_size * cache.layout.num_buffers)


def _budget_tokens(cache: Any, budget: int) -> int:
    """How many tokens one request could hold if it had the whole `budget`."""
    if hasattr(cache, "block_bytes"):
        return int(budget // cache.block_bytes * cache.block_size)
    pages = budget // cache.page_size // cache.layout.num_buffers  # per buffer
    return int(pages * cache.page_size // cache.layout.buffer_token_bytes)


def _sampling_defaults(source: str, model_path: str) -> dict[str, Any]:
    """`EngineConfig.generation_config`'s sampling defaults, checked to make `SamplingParams`."""
    if source == "none":
        return {}
    if source != "auto" and not Path(source).exists():
        raise ValueError(
            f"generation_config {source!r}: give 'auto', 'none', or a directory or file "
            f"holding a generation_config.json"
        )
    defaults = sampling_defaults(model_path if source == "auto" else source)
    try:
        SamplingParams(**defaults)
    except (ValueError, TypeError) as e:
        raise ValueError(f"generation_config {source!r} gives bad sampling defaults: {e}") from None
    return defaults


def _tokenizer_or_none(path: str) -> Any:
    """The model's tokenizer, a byte-level fallback for checkpoints without one, or None when
    even that cannot cover the vocabulary (then prompts must be token ids)."""
    try:
        return load_tokenizer(path, fallback=True)
    except ValueError:
        return None
