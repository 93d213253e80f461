"""`auto` (the default backend): picks a contiguous kernel per batch phase.

On CUDA:
- decode-only batches -> `decode` (default `triton_decode`; `fa2_varlen` or `sdpa` without Triton);
- batches with prefill -> `prefill`: with `sdpa` (the default) each prefill request is one SDPA
  call (cuDNN for fresh prompts) and the batch's decode requests, if any, go to the decode kernel
  in one launch; when more than `varlen_above` requests need prefill, or with
  `prefill="fa2_varlen"`, the whole batch is one FA2 varlen launch instead.
On the CPU every batch takes `torch_sdpa_ref`.
Each sub-backend shares the cache; per-step index tensors are built once per metadata object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattention.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    KVCacheView,
    get_backend_class,
    register_backend,
)
from vattention.attention.contiguous import ContiguousBackend
from vattention.attention.sdpa import prefer_cudnn, sdpa_requests
from vattention.attention.torch_ref import TorchSDPARef
from vattention.attention.triton_decode import TritonDecodeBackend, triton_usable

_DECODE_CHOICES = ("triton_decode", "fa2_varlen", "sdpa", "flex", "torch_sdpa_ref")
_PREFILL_CHOICES = ("sdpa", "fa2_varlen")


@dataclass(frozen=True)
class _Split:
    """A mixed batch cut into prefill requests and decode requests (rows, slots, lengths)."""

    prefill: list[int]
    decode_rows: torch.Tensor | None
    decode_slots: torch.Tensor | None
    decode_lens: torch.Tensor | None
    decode_max_len: int


@register_backend
class AutoBackend(ContiguousBackend):
    """Triton split-K decode, cuDNN/flash SDPA prefill, FA2 varlen for many-prompt batches."""

    name = "auto"

    def __init__(
        self,
        cache: KVCacheView,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        *,
        decode: str | None = None,
        prefill: str = "sdpa",
        varlen_above: int = 8,
    ) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim, scale)
        if decode is not None and decode not in _DECODE_CHOICES:
            raise ValueError(f"decode must be one of {_DECODE_CHOICES}, got {decode!r}")
        if prefill not in _PREFILL_CHOICES:
            raise ValueError(f"prefill must be one of {_PREFILL_CHOICES}, got {prefill!r}")
        args = (cache, num_heads, num_kv_heads, head_dim, self.scale)
        self._ref = TorchSDPARef(*args)
        self._varlen: AttentionBackend | None = None
        self._decode: AttentionBackend = self._ref
        self.prefill = prefill
        self.varlen_above = varlen_above
        if self.device.type != "cuda":
            return
        fa2_ok = (
            self.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and not head_dim % 8
        )
        if fa2_ok:
            self._varlen = get_backend_class("fa2_varlen")(*args)
        elif prefill == "fa2_varlen":
            raise ValueError(
                f"fa2_varlen cannot run this cache ({self.dtype}, head_dim {head_dim})"
            )
        if decode is None:
            pow2 = head_dim >= 16 and not head_dim & (head_dim - 1)
            if triton_usable(self.device) is None and pow2:
                decode = "triton_decode"
            else:
                decode = "fa2_varlen" if fa2_ok else "sdpa"
        self._decode = get_backend_class(decode)(*args)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.check_q(q, meta)
        if self.device.type != "cuda":
            return self._ref.attend(layer, q, meta)
        if meta.is_decode_only:
            return self._decode.attend(layer, q, meta)
        split = self._plan(meta, "auto_split", lambda: self._split(meta))
        if self._varlen is not None and (
            self.prefill == "fa2_varlen" or len(split.prefill) > self.varlen_above
        ):
            return self._varlen.attend(layer, q, meta)
        k_cache, v_cache = self.layer_kv(layer)
        out = torch.empty_like(q)
        with prefer_cudnn(True):
            sdpa_requests(
                q, k_cache, v_cache, meta, self.starts(meta), split.prefill, self.scale, out
            )
        if split.decode_rows is not None:
            rows = split.decode_rows
            if isinstance(self._decode, TritonDecodeBackend):
                out[rows] = self._decode.decode(
                    q[rows], k_cache, v_cache, split.decode_slots, split.decode_lens,
                    split.decode_max_len,
                )  # fmt: skip
            else:
                sdpa_requests(
                    q, k_cache, v_cache, meta, self.starts(meta), self._decode_ids(meta),
                    self.scale, out,
                )  # fmt: skip
        return out

    @staticmethod
    def _decode_ids(meta: AttentionMetadata) -> list[int]:
        return [i for i, n in enumerate(meta.query_lens_host) if n == 1]

    def _split(self, meta: AttentionMetadata) -> _Split:
        prefill = [i for i, n in enumerate(meta.query_lens_host) if n > 1]
        decode = self._decode_ids(meta)
        if not decode:
            return _Split(prefill, None, None, None, 0)
        starts = self.starts(meta)
        dev = meta.slots.device
        rows = torch.tensor([starts[i] for i in decode], dtype=torch.int64).to(dev)
        idx = torch.tensor(decode, dtype=torch.int64).to(dev)
        max_len = max(meta.seq_lens_host[i] for i in decode)
        return _Split(prefill, rows, meta.slots[idx], meta.seq_lens[idx], max_len)
