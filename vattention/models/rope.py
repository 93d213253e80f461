"""Rotary position embeddings (RoPE) with a precomputed cos/sin cache, looked up by position.

The cache holds `[max_positions, head_dim]` = `[cos | sin]` of `position * inv_freq`, computed in
float32 once; a forward step gathers the rows of its tokens' positions (from
`AttentionMetadata.token_positions`) once and every layer reuses them. Rotation is the
"rotate-half" (GPT-NeoX) form that Hugging Face Llama checkpoints use. Supported frequency
scalings: none, `linear` and `llama3` (see `ModelConfig.rope_scaling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vattention.models.config import RopeScaling


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> torch.Tensor:
    """`[head_dim // 2]` float32 inverse frequencies, with the given scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling {scaling.rope_type!r}")
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # the two cut-offs blended linearly in 1/wavelength.
    old_len = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / scaling.factor, inv_freq)
    blend = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - blend) * scaled / scaling.factor + blend * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Owns the cos/sin cache; `lookup(positions)` -> (cos, sin), each `[T, 1, head_dim // 2]`."""

    cos_sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        # Built on the current default device (cheap on "meta"; see `init_cache`).
        self.register_buffer("cos_sin", self._compute(None), persistent=False)

    def _compute(self, device: torch.device | None) -> torch.Tensor:
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        if device is not None:
            inv_freq = inv_freq.to(device)
        pos = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def init_cache(self) -> None:
        """(Re)compute the cache in float32 on the buffer's device (after a meta-device build)."""
        device = self.cos_sin.device
        if device.type == "meta":
            raise ValueError("move the model off the meta device (to_empty) before init_cache")
        self.cos_sin = self._compute(device)

    def inputs(self, positions: torch.Tensor, dtype: torch.dtype, fused: bool) -> RopeInputs:
        if fused:
            return RopeInputs(positions, self.cos_sin, None, None, True)
        cos, sin = self.lookup(positions, dtype)
        return RopeInputs(positions, self.cos_sin, cos, sin, False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        rows = self.cos_sin.index_select(0, positions).to(dtype)
        cos, sin = rows.unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


@dataclass(frozen=True)
class RopeInputs:
    """What the attention layers need to rotate q and k for one forward pass.

    Fused (CUDA): the float32 cache and the positions, for `fused.rope_qkv`. Otherwise the
    per-token (cos, sin) rows, looked up once per pass and shared by every layer."""

    positions: torch.Tensor
    cos_sin: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    fused: bool


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[T, heads, head_dim]` by (cos, sin) `[T, 1, head_dim // 2]` (rotate-half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
