"""`torch_sdpa_ref`: the plain torch path, one `scaled_dot_product_attention` call per request.

Runs anywhere torch runs (CPU and CUDA; fp32, fp16, bf16): request i attends over
`k_cache(layer)[slot_i, :seq_len_i]` (a strided view, never copied) with a bottom-right causal
mask when it has more than one new token. It is the correctness baseline of the other backends
and the CPU path of `auto`. Uses the host copies of the metadata only (no device syncs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vattention.attention.base import AttentionMetadata, register_backend
from vattention.attention.contiguous import ContiguousBackend, causal_bool_mask


def attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    context_len: int,
) -> torch.Tensor:
    """Causal attention of `q [n, Hq, D]` over `k, v [S, Hkv, D]` (query j at `context_len + j`)."""
    n, seq_len = q.shape[0], k.shape[0]
    if context_len == 0 and n > 1:
        mask, causal = None, True
    else:
        mask, causal = causal_bool_mask(n, seq_len, q.device), False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def attend_per_request(
    backend: ContiguousBackend,
    layer: int,
    q: torch.Tensor,
    meta: AttentionMetadata,
    out: torch.Tensor,
) -> None:
    """Fill `out` one request at a time."""
    k_cache, v_cache = backend.layer_kv(layer)
    starts = backend.starts(meta)
    for i in range(meta.num_seqs):
        slot, seq_len = meta.slots_host[i], meta.seq_lens_host[i]
        a, b = starts[i], starts[i + 1]
        out[a:b] = attend_one(
            q[a:b],
            k_cache[slot, :seq_len],
            v_cache[slot, :seq_len],
            backend.scale,
            seq_len - (b - a),
        )


@register_backend
class TorchSDPARef(ContiguousBackend):
    """Per-request torch SDPA over slot views: correct everywhere, fast nowhere."""

    name = "torch_sdpa_ref"

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.check_q(q, meta)
        out = torch.empty_like(q)
        attend_per_request(self, layer, q, meta, out)
        return out
