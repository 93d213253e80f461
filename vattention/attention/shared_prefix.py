"""`SharedPrefix`: a prefix some rows of a decode batch share, for cascade decoding.

Kept apart from the kernels (`decode_kernels.py`, which needs Triton) so the engine can build
one on any install. See `decode_kernels.decode_attention` for how it is attended and
`engine/cascade.py` for how a step's is found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedPrefix:
    """A prefix some requests of a decode batch share (cascade decoding; `decode_attention`).

    `lens [B]` (int32, device): `length` for a request that shares it, 0 for one that does not
    (padding rows: 0); a sharer's own tokens must go past it (`seq_lens[b] > length`).
    `length [1]` and `leader [1]` (int32, device): the prefix's tokens and the slot (paged: the
    row of `block_tables`) of a sharer, whose copy is read for all. Device tensors, so a CUDA
    graph replays with new values; `max_length` (host) sizes the grid: every `length` of a
    replay must be at most it. `partition_size`: prefix tokens per program (None: by
    `prefix_partition_size`)."""

    lens: torch.Tensor
    length: torch.Tensor
    leader: torch.Tensor
    max_length: int
    partition_size: int | None = None
