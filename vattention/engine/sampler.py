"""The sampler: batched token choice from float32 logits `[B, vocab]`, on the logits' device.

Pipeline per row (vectorised over the batch; only seeded rows cost a Python step each):
penalties (only rows asking for them, `penalties.py`) -> logit bias (and, banned: below
`min_tokens` the stop tokens, and any token that would complete a bad word) -> the
`allowed_token_ids` mask -> the grammar's token bitmask (structured outputs: constrained rows
only, `structured.py`) -> temperature -> top-k -> top-p ->
min-p -> sample by exponential race (`argmax(probs / q)` with `q ~ Exp(1)`, which draws from
`probs` exactly).

Invariants:
- greedy rows (temperature 0) get the exact `argmax` of their raw logits (penalised, if they
  ask for penalties), whatever the rest of the batch is doing;
- a seeded row draws its noise from its own `torch.Generator` (one `[vocab]` draw per step), so
  its tokens depend only on its seed, its logits and how many tokens it has drawn before: not on
  batch size, row position or neighbours; unseeded rows share one generator;
- masked tokens get probability exactly 0 and are never drawn; the most likely token always
  survives every filter;
- log-probabilities are those of the model (log-softmax of the raw logits, before temperature
  and filters), as vLLM returns by default.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vattention.engine.logprobs import Logprobs, logprobs_of
from vattention.engine.penalties import PenaltyBatch, PenaltyState
from vattention.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from vattention.engine.request import Request

# Above this k, one sort of the vocabulary is cheaper than `topk`.
TOPK_SORT_THRESHOLD = 1024


@dataclass(frozen=True)
class SamplingMetadata:
    """Per-step sampling tensors for B rows, built once on the host and moved to the device.

    Filters a batch does not use are None, so their kernels are skipped without a device sync.
    """

    num_rows: int
    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows (their result is argmax anyway)
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64; 0 = off
    max_top_k: int
    top_p: torch.Tensor | None  # [B] float32; 1.0 = off
    min_p: torch.Tensor | None  # [B] float32; 0.0 = off
    generators: dict[int, torch.Generator]  # row -> its own generator (seeded, non-greedy rows)
    num_logprobs: int | None  # most top log-probabilities any row asked for; None = no row
    penalties: PenaltyBatch | None = None  # rows with penalties; None = no row
    # (rows, token ids, values) of every row's logit bias, flattened; None = no row
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # (token bitmask [B, ceil(vocab / 32)] int32, constrained rows) of structured-output rows;
    # None = no row
    guided: tuple[torch.Tensor, list[int]] | None = None
    # (rows, their masks [n, vocab] float32: 0 where allowed, -inf elsewhere) of the rows with
    # `allowed_token_ids`; None = no row
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        device: torch.device | str = "cpu",
        penalty_states: Sequence[PenaltyState | None] | None = None,
        banned: Sequence[Sequence[int]] | None = None,
        guided: tuple[torch.Tensor, list[int]] | None = None,
        allowed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplingMetadata:
        """Tensors for `params` (one per row); `generators[i]` is row i's own generator or None;
        `penalty_states[i]` row i's token counts, needed where its params ask for penalties;
        `banned[i]` tokens row i may not sample now (a request below its `min_tokens`);
        `guided` the token bitmask of the structured-output rows and those rows."""
        if generators is not None and len(generators) != len(params):
            raise ValueError(f"got {len(generators)} generators for {len(params)} rows")
        if penalty_states is not None and len(penalty_states) != len(params):
            raise ValueError(f"got {len(penalty_states)} penalty states for {len(params)} rows")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
        device = torch.device(device)
        pen_rows = [i for i, p in enumerate(params) if p.needs_penalties]
        penalties = None
        if pen_rows:
            states = [None if penalty_states is None else penalty_states[i] for i in pen_rows]
            if any(s is None for s in states):
                raise ValueError("rows asking for penalties need their penalty states")
            penalties = PenaltyBatch.build(
                pen_rows,
                [s for s in states if s is not None],
                [params[i].penalty_factors for i in pen_rows],
                device,
            )
        bias = None
        entries = [(i, t, v) for i, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
        if banned is not None:
            entries += [(i, t, float("-inf")) for i, ts in enumerate(banned) for t in ts]
        if entries:
            rows, toks, vals = zip(*entries, strict=True)
            bias = (
                torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True),
                torch.tensor(toks, dtype=torch.int64).to(device, non_blocking=True),
                torch.tensor(vals, dtype=torch.float32).to(device, non_blocking=True),
            )
        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        temps = [1.0 if p.greedy else float(p.temperature) for p in params]

        def to_dev(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        any_k = not all_greedy and any(p.needs_top_k and not p.greedy for p in params)
        any_p = not all_greedy and any(p.needs_top_p and not p.greedy for p in params)
        any_min_p = not all_greedy and any(p.needs_min_p and not p.greedy for p in params)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        gens: dict[int, torch.Generator] = {}
        if generators is not None:
            for i, g in enumerate(generators):
                if g is not None and not params[i].greedy:
                    if g.device.type != device.type:
                        raise ValueError(
                            f"row {i}: generator on {g.device} but sampling on {device}"
                        )
                    gens[i] = g
        return cls(
            num_rows=len(params),
            greedy=to_dev(greedy, torch.bool),
            temperature=to_dev(temps, torch.float32),
            all_greedy=all_greedy,
            top_k=to_dev([max(p.top_k, 0) for p in params], torch.int64) if any_k else None,
            max_top_k=max((p.top_k for p in params if not p.greedy), default=0) if any_k else 0,
            top_p=to_dev([float(p.top_p) for p in params], torch.float32) if any_p else None,
            min_p=to_dev([float(p.min_p) for p in params], torch.float32) if any_min_p else None,
            generators=gens,
            num_logprobs=max(wanted) if wanted else None,
            penalties=penalties,
            bias=bias,
            guided=guided,
            allowed=allowed,
        )

    @classmethod
    def for_requests(
        cls, requests: Sequence[Request], device: torch.device | str, vocab_size: int = 0
    ) -> SamplingMetadata:
        """Metadata for a step's sampling rows: each request's params, its own generator and
        (for requests with penalties; `vocab_size` is the logits' width) its token counts.

        Runs every step: a batch of unseeded greedy rows (the common serving case) is detected
        in one pass and gets its (constant) tensors from a cache, with no per-row tensors built
        and no host-to-device copy; the result equals `build`'s."""
        device = torch.device(device)
        wanted = -1  # most top log-probabilities asked for; -1: none
        for r in requests:
            p = r.params
            if not p.plain_greedy:
                break
            if p.logprobs is not None and p.logprobs > wanted:
                wanted = p.logprobs
        else:
            if requests:
                greedy, temperature = _all_greedy_tensors(device, len(requests))
                return cls(
                    num_rows=len(requests),
                    greedy=greedy,
                    temperature=temperature,
                    all_greedy=True,
                    top_k=None,
                    max_top_k=0,
                    top_p=None,
                    min_p=None,
                    generators={},
                    num_logprobs=None if wanted < 0 else wanted,
                )
        gens = [r.generator(device) for r in requests]
        states: list[PenaltyState | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            if r.params.needs_penalties:
                if vocab_size <= 0:
                    raise ValueError("penalties need the vocabulary size (vocab_size)")
                states[i] = r.penalty_state(vocab_size, device)
        banned = [_banned_now(r) for r in requests]
        guided = None
        matchers = [r.guided for r in requests]
        if any(m is not None for m in matchers):
            if vocab_size <= 0:
                raise ValueError("structured outputs need the vocabulary size (vocab_size)")
            from vattention.engine.structured import guided_bitmask

            guided = guided_bitmask(matchers, vocab_size, device)
        allowed = None
        rows = [i for i, r in enumerate(requests) if r.params.allowed_token_ids is not None]
        if rows:
            if vocab_size <= 0:
                raise ValueError("allowed_token_ids need the vocabulary size (vocab_size)")
            masks = torch.stack([requests[i].allowed_mask(vocab_size, device) for i in rows])
            allowed = (torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True), masks)
        return cls.build(
            [r.params for r in requests], gens, device, states, banned if any(banned) else None,
            guided, allowed,
        )  # fmt: skip


def _banned_now(r: Request) -> list[int]:
    """The tokens `r` may not sample in this step: those completing a bad word
    (`params.bad_words`), and its end-of-sequence tokens (unless `ignore_eos`) and stop
    token ids while fewer than `min_tokens` precede this one (the outputs the host has plus
    the other launched steps' tokens)."""
    p = r.params
    bad = r.bad_tokens_now() if r.bad_word_ids else []
    if not p.min_tokens or r.guided is not None:  # a grammar decides when it may end
        return bad
    if len(r.output_token_ids) + r.num_inflight - 1 >= p.min_tokens:
        return bad
    eos = [] if p.ignore_eos else sorted(r.eos_token_ids)
    return sorted(set(eos) | set(p.stop_token_ids) | set(bad))


@functools.lru_cache(maxsize=256)
def _all_greedy_tensors(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`greedy` (all True) and `temperature` (all 1.0) of n greedy rows on `device`, built once
    per size (read-only: the sampler never writes them)."""
    greedy = torch.ones(n, dtype=torch.bool, device=device)
    return greedy, torch.ones(n, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, on the logits' device
    logprobs: Logprobs | None


class Sampler:
    """Chooses one token per row. `seed` fixes the generator shared by unseeded rows."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def shared_generator(self, device: torch.device) -> torch.Generator | None:
        """The generator of unseeded rows on `device` (None = torch's default one)."""
        if self.seed is None:
            return None
        if device not in self._shared:
            self._shared[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._shared[device]

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(f"logits must be a 2-D tensor [batch, vocab], got {_shape(logits)}")
        if logits.shape[0] != meta.num_rows:
            raise ValueError(f"logits have {logits.shape[0]} rows, metadata {meta.num_rows}")
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        if meta.greedy.device != logits.device:
            raise ValueError(f"metadata is on {meta.greedy.device} but logits on {logits.device}")
        raw = logits.float()
        logits = raw if meta.penalties is None else meta.penalties.apply(raw)
        if meta.bias is not None:
            logits = logits.index_put(meta.bias[:2], meta.bias[2], accumulate=True)
        if meta.allowed is not None:  # -inf on every token a row does not allow
            logits = logits.index_add(0, meta.allowed[0], meta.allowed[1])
        if meta.guided is not None:
            from vattention.engine.structured import apply_bitmask

            if logits is raw:  # log-probabilities stay the model's (from `raw`)
                logits = raw.clone()
            apply_bitmask(logits, *meta.guided)
        greedy_ids = logits.argmax(dim=-1)
        if meta.all_greedy:
            token_ids = greedy_ids
        else:
            probs = self.probs(logits, meta)
            sampled = self._race(probs, meta)
            token_ids = torch.where(meta.greedy, greedy_ids, sampled)
        if meta.penalties is not None:
            meta.penalties.record(token_ids)
        logprobs = None if meta.num_logprobs is None else _logprobs(raw, token_ids, meta)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """What each non-greedy row samples from: probabilities after temperature and the
        top-k / top-p / min-p filters (float32 `[B, vocab]`; filtered tokens are exactly 0)."""
        scaled = logits.float() / meta.temperature.unsqueeze(1)
        keep = None
        if meta.top_p is not None or meta.max_top_k > TOPK_SORT_THRESHOLD:
            keep = _sorted_keep(scaled, meta.top_k, meta.top_p)
        elif meta.top_k is not None:
            keep = _top_k_keep(scaled, meta.top_k, meta.max_top_k)
        if keep is not None:
            scaled = scaled.masked_fill(~keep, float("-inf"))
        if meta.min_p is not None:
            # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); log(0) = -inf keeps all.
            floor = scaled.amax(dim=-1, keepdim=True) + torch.log(meta.min_p).unsqueeze(1)
            scaled = scaled.masked_fill(scaled < floor, float("-inf"))
        return torch.softmax(scaled, dim=-1)

    def _race(self, probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """One draw per row from `probs`: argmax(probs / q), q ~ Exp(1) per entry."""
        q = torch.empty_like(probs)
        if len(meta.generators) < meta.num_rows:
            q.exponential_(generator=self.shared_generator(probs.device))
        for row, gen in meta.generators.items():
            q[row].exponential_(generator=gen)
        # Exp(1) can round to 0; a tiny floor keeps p/q finite and 0/q == 0 for masked tokens.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)


def _top_k_keep(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Mask of each row's k most likely tokens (all tokens where k is 0); one `topk` call."""
    vocab = logits.shape[1]
    k = min(max_k, vocab)
    idx = logits.topk(k, dim=-1).indices
    rank = torch.arange(k, device=logits.device).unsqueeze(0)
    keep_top = rank < top_k.unsqueeze(1)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, keep_top)
    return keep | (top_k == 0).unsqueeze(1)


def _sorted_keep(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask after top-k then top-p, computed in sorted order and scattered back."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True, stable=True)
    vocab = logits.shape[1]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
        drop = torch.arange(vocab, device=logits.device).unsqueeze(0) >= k
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly ahead of each token
        p = top_p.unsqueeze(1)
        drop = drop | ((before >= p) & (p < 1.0))
    drop[:, 0] = False  # the most likely token always survives
    return torch.empty_like(drop).scatter_(1, idx, ~drop)


def _logprobs(logits: torch.Tensor, token_ids: torch.Tensor, meta: SamplingMetadata) -> Logprobs:
    return logprobs_of(logits, token_ids, meta.num_logprobs or 0)


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
