"""Building blocks of Llama-family models: RMSNorm, fused linear projections, SiLU-and-mul.

Tensors are token-flattened `[T, features]` (no batch dimension). A `FusedLinear` is one
`nn.Linear` whose output rows are several checkpoint matrices stacked in order (e.g. `[q; k; v]`
or `[gate; up]`); `output_sizes` records the parts so the loader can copy each checkpoint tensor
into its rows. No module here has data-dependent Python control flow (CUDA-graph safe).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm. CPU: in float32, cast back before the weight (as HF does);
    CUDA: torch's fused kernel (float32 accumulation, weight applied before the one rounding)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused kernel (accumulates in float32, rounds once)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor, fused: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(`self(x + residual)`, `x + residual`): the residual add before the norm, in one
        Triton launch with `fused` (CUDA: `models.fused.add_rms_norm`, the same roundings)."""
        if fused:
            from vattention.models.fused import add_rms_norm

            return add_rms_norm(x, residual, self.weight, self.eps)
        summed = x + residual
        return self(summed), summed


class FusedLinear(nn.Linear):
    """A linear layer whose output is the concatenation of `output_sizes` projections."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        if not output_sizes or any(s <= 0 for s in output_sizes):
            raise ValueError(f"output_sizes must be positive, got {list(output_sizes)}")
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = tuple(output_sizes)

    def shard_offset(self, index: int) -> tuple[int, int]:
        """(first output row, number of rows) of part `index`."""
        return sum(self.output_sizes[:index]), self.output_sizes[index]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`[T, 2*I]` laid out as `[gate | up]` -> `silu(gate) * up`, `[T, I]`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
