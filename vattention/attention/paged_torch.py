"""`paged_torch`: the paged cache's plain torch path, correct on any device.

Per request: gather its blocks into a dense `[seq_len, kv_heads, head_dim]` copy (one
`index_select` per tensor), then one causal SDPA call (`torch_ref.attend_one`, bottom-right
aligned, GQA). A correctness baseline and the paged CPU path; it pays a copy of every request's
K/V per layer, so it is not a performance baseline (`paged_triton` and `paged_flex` are).
"""

from __future__ import annotations

import torch

from vattention.attention.base import AttentionMetadata, register_backend
from vattention.attention.paged_base import PagedBackend
from vattention.attention.torch_ref import attend_one


def attend_gathered(
    backend: PagedBackend,
    layer: int,
    q: torch.Tensor,
    meta: AttentionMetadata,
    requests: list[int],
    out: torch.Tensor,
) -> None:
    """Fill `out` rows of the given requests by gather-then-SDPA."""
    starts = backend.query_starts(meta)
    for i in requests:
        a, b = starts[i], starts[i + 1]
        k, v = backend.gather(layer, meta, i)
        out[a:b] = attend_one(q[a:b], k, v, backend.scale, meta.seq_lens_host[i] - (b - a))


@register_backend
class PagedTorchBackend(PagedBackend):
    """Gather each request's blocks, then SDPA."""

    name = "paged_torch"

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.check_step(q, meta)
        out = torch.empty_like(q)
        attend_gathered(self, layer, q, meta, list(range(meta.num_seqs)), out)
        return out
