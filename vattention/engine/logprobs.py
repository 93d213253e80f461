"""Log-probabilities: the sampler's per-step device tensors and each request's host records.

Invariants: values are the model's log-probabilities (log-softmax of raw logits); `Logprobs` row
i belongs to the sampler's row i; a request that asked for k top alternatives gets the first k
of its row's top list (most likely first), plus its sampled token's own value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
