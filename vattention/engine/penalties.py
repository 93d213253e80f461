"""Repetition, frequency and presence penalties (vLLM's and OpenAI's meanings), on the device.

For a request that asks for any of them, `PenaltyState` keeps on the logits' device how often
each token was generated so far (`counts [vocab]` int32) and which tokens its prompt holds
(`prompt [vocab]` bool). A step's `PenaltyBatch` changes its rows' logits from those and, once
the tokens are chosen, adds each to its request's `counts` on the device (stream-ordered). So
a step launched before the host has seen the previous step's tokens (async scheduling) still
counts them, and nothing waits for the GPU. For a row's logit `l` of token t:
- repetition `r` (> 0; 1 = off), on tokens of the prompt or the output: `l / r` if `l > 0`,
  else `l * r`;
- frequency `f` and presence `p` (in [-2, 2]; 0 = off), on output tokens only:
  `l - f * count(t) - p * (count(t) > 0)`.
Greedy rows take the argmax of the penalised logits. Log-probabilities stay those of the
model's raw logits. A request's state lives as long as the request (a preempted request keeps
its counts: its outputs are kept and recomputed, not redrawn).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class PenaltyState:
    """One request's token counts and prompt-token mask on the device."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        vocab: int,
        device: torch.device | str,
    ) -> None:
        self.vocab = vocab
        self.counts = torch.zeros(vocab, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
        ids = [t for t in prompt_ids if 0 <= t < vocab]
        if ids:
            self.prompt[torch.tensor(ids, dtype=torch.int64, device=device)] = True
        out = [t for t in output_ids if 0 <= t < vocab]
        if out:
            index = torch.tensor(out, dtype=torch.int64, device=device)
            self.counts.index_add_(0, index, torch.ones_like(index, dtype=torch.int32))


@dataclass(frozen=True)
class PenaltyBatch:
    """The rows of a step that use penalties, their states and their factors `[P, 1]`."""

    rows: list[int]  # rows of the step's logits
    states: list[PenaltyState]
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor

    @classmethod
    def build(
        cls,
        rows: list[int],
        states: list[PenaltyState],
        factors: list[tuple[float, float, float]],
        device: torch.device,
    ) -> PenaltyBatch:
        """`factors[i]` = (repetition, frequency, presence) of row `rows[i]`."""
        cols = torch.tensor(factors, dtype=torch.float32).to(device, non_blocking=True)
        return cls(rows, states, cols[:, 0:1], cols[:, 1:2], cols[:, 2:3])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of float32 `logits [B, vocab]` with the penalised rows changed."""
        vocab = logits.shape[1]
        for s in self.states:
            if s.vocab != vocab:
                raise ValueError(f"penalty state for {s.vocab} tokens, logits have {vocab}")
        rows = torch.tensor(self.rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        sub = logits.index_select(0, rows)
        counts = torch.stack([s.counts for s in self.states]).float()
        seen = torch.stack([s.prompt for s in self.states]) | (counts > 0)
        rep = self.repetition
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - self.frequency * counts - self.presence * (counts > 0).float()
        return logits.index_copy(0, rows, sub)

    def record(self, token_ids: torch.Tensor) -> None:
        """Add each penalised row's chosen token (`token_ids [B]`, on the device) to its counts."""
        for row, s in zip(self.rows, self.states, strict=True):
            t = token_ids[row : row + 1]
            s.counts.index_add_(0, t, torch.ones_like(t, dtype=torch.int32))
