"""Embeddings from the model: last-token pooling of the final hidden state (vLLM's `embed` for
decoder models, as Qwen3-Embedding and e5-mistral are used).

An embedding request is an engine request with `PoolingParams`: it samples once (greedy, no
text, max 1 token) and finishes; the step that computes its prompt's last token runs eagerly
(no CUDA graph: graphs return logits only) and hands that token's final-normed hidden state,
in float32, to `Request.embedding` (truncated to `dimensions`, then L2-normalized unless
`normalize` is off). Its sampled token is dropped.

Invariants: a pooling request's embedding is set exactly once, by the step whose row samples
for it (its prompt's end; prefix-cache hits never cover the last prompt token, so it is always
computed); `SchedulerOutput.pooling` lists those rows (indices into `sampling`) and is None in
every step without one (what plain traffic pays: one check).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vattention.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class PoolingParams:
    """How to turn a prompt into an embedding: its last token's final hidden state, cut to the
    first `dimensions` features (None: all), L2-normalized unless `normalize` is False."""

    normalize: bool = True
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {self.normalize!r}")
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"dimensions must be a positive int or None, got {d!r}")

    def sampling(self) -> SamplingParams:
        """The sampling an embedding request runs with: one greedy token, no text."""
        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)


def finish_embedding(row: Sequence[float], params: PoolingParams) -> list[float]:
    """A pooled row (the hidden state, float32) as the request's embedding."""
    x = torch.tensor(list(row), dtype=torch.float32)
    if params.dimensions is not None:
        x = x[: params.dimensions]
    if params.normalize:
        x = torch.nn.functional.normalize(x, dim=0)
    return x.tolist()  # type: ignore[no-any-return]
