"""`triton_decode`: the split-K Triton decode kernel (`decode_kernels`) as an attention backend.

Decode only: every request of a batch must bring exactly one new token (`auto` routes prefill
elsewhere). Runs on CUDA, or on the CPU under the Triton interpreter (`TRITON_INTERPRET=1`,
small shapes, for tests). Launch knobs (`partition_size` or `num_splits`, `block_n`,
`num_warps`, `num_stages`) are constructor options so a benchmark can tune them; by default the
partition size is chosen from batch size, KV heads and the batch's longest context to fill the
GPU's SMs (`decode_kernels.default_partition_size`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vattention.attention.base import AttentionMetadata, KVCacheView, register_backend
from vattention.attention.contiguous import ContiguousBackend


def triton_usable(device: torch.device) -> str | None:
    """None when Triton kernels can run on `device`, else the reason why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton runs on CUDA, or on the CPU only with TRITON_INTERPRET=1 (cache on {device})"


@register_backend
class TritonDecodeBackend(ContiguousBackend):
    """Split-K decode over the contiguous cache, GQA groups sharing K/V loads."""

    name = "triton_decode"
    decode_only = True
    supports_decode_graphs = True
    supports_cascade = True

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        *,
        num_splits: int | None = None,
        block_n: int | None = None,
        num_warps: int = 4,
        num_stages: int = 2,
        partition_size: int | None = None,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        reason = triton_usable(self.device)
        if reason is not None:
            raise ValueError(f"triton_decode unavailable: {reason}")
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"triton_decode needs a power-of-two head_dim >= 16, got {head_dim}")
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        if partition_size is not None and (partition_size < 1 or num_splits is not None):
            raise ValueError(
                f"partition_size must be >= 1 and exclusive with num_splits, got "
                f"{partition_size} (num_splits={num_splits})"
            )
        self.num_splits = num_splits
        self.partition_size = partition_size
        self.block_n = block_n
        self.num_warps = num_warps
        self.num_stages = num_stages

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.check_q(q, meta)
        if not meta.is_decode_only:
            raise ValueError(
                f"triton_decode handles decode batches only (max_query_len 1), got "
                f"{meta.max_query_len}; use 'auto' for prefill and mixed batches"
            )
        k_cache, v_cache = self.layer_kv(layer)
        return self.decode(
            q, k_cache, v_cache, meta.slots, meta.seq_lens, meta.max_seq_len, meta.prefix
        )

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: torch.Tensor,
        max_seq_len: int,
        prefix: Any = None,
    ) -> torch.Tensor:
        """The kernel on `q [B, Hq, D]` for the requests in `slots` (a subset of a batch is fine;
        `prefix`, a `SharedPrefix` over exactly these rows, only for a whole batch)."""
        from vattention.attention.decode_kernels import decode_attention

        return decode_attention(
            q,
            k_cache,
            v_cache,
            slots,
            seq_lens,
            self.scale,
            max_seq_len,
            num_splits=self.num_splits,
            block_n=self.block_n,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            partition_size=self.partition_size,
            prefix=prefix,
        )
