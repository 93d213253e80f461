"""Log-probabilities: the per-step device tensors and each request's host records.

Invariants: values are the model's log-probabilities (log-softmax of raw float32 logits);
`Logprobs` row i belongs to the sampler's row i (sampled tokens) or to the step's i-th prompt
position (`SchedulerOutput.prompt_logprobs`, in order: the token is then the prompt's own); a
request that asked for k top alternatives gets the first k of its row's top list (most likely
first), plus its token's own value. Prompt positions are computed in slices of rows
(`prompt_logprobs`), so no more than `PROMPT_SLICE_ELEMENTS` float32 logits exist at once
however long the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Most float32 logits (rows x vocab) one slice of prompt log-probabilities materialises: 64 MiB,
# about 130 rows of a 128K vocabulary.
PROMPT_SLICE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability and the top alternatives (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Logprobs:
    """One step's log-probabilities on the device.

    `sampled[i]` is row i's sampled token's log-probability; `top_ids[i, :k]` and
    `top_values[i, :k]` its k most likely tokens (K = the most any row asked for).
    """

    sampled: torch.Tensor  # [B] float32
    top_ids: torch.Tensor  # [B, K] int64
    top_values: torch.Tensor  # [B, K] float32

    @property
    def num_rows(self) -> int:
        return int(self.sampled.shape[0])

    def to_host(self) -> HostLogprobs:
        """Copy to Python lists once per step (one transfer per tensor)."""
        return HostLogprobs(self.sampled.tolist(), self.top_ids.tolist(), self.top_values.tolist())


@dataclass(frozen=True)
class HostLogprobs:
    sampled: list[float]
    top_ids: list[list[int]]
    top_values: list[list[float]]

    def entry(self, row: int, token_id: int, k: int) -> TokenLogprobs:
        """Row `row`'s record for its sampled `token_id`, with `k` top alternatives."""
        top = tuple(zip(self.top_ids[row][:k], self.top_values[row][:k], strict=True))
        return TokenLogprobs(token_id, self.sampled[row], top)


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> Logprobs:
    """Each row's `token_ids[i]` log-probability and its k most likely tokens, from `logits`
    `[B, vocab]` (log-softmax in float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    sampled = logp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    k = min(k, logits.shape[1])
    if k > 0:
        top = logp.topk(k, dim=-1)
        return Logprobs(sampled=sampled, top_ids=top.indices, top_values=top.values)
    empty = torch.empty(logits.shape[0], 0, dtype=torch.int64, device=logits.device)
    return Logprobs(sampled=sampled, top_ids=empty, top_values=empty.float())


def prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    vocab_size: int,
) -> Logprobs:
    """Log-probabilities of `targets[i]` (a prompt token) given the hidden state
    `hidden[rows[i]]` (its predecessor's), with k top alternatives: logits, log-softmax and
    top-k in slices of at most `PROMPT_SLICE_ELEMENTS // vocab_size` rows."""
    step = max(1, PROMPT_SLICE_ELEMENTS // max(1, vocab_size))
    parts = [
        logprobs_of(compute_logits(hidden[rows[a : a + step]]), targets[a : a + step], k)
        for a in range(0, int(rows.shape[0]), step)
    ]
    if len(parts) == 1:
        return parts[0]
    return Logprobs(
        sampled=torch.cat([p.sampled for p in parts]),
        top_ids=torch.cat([p.top_ids for p in parts]),
        top_values=torch.cat([p.top_values for p in parts]),
    )
