"""`auto` (the default backend): picks a contiguous kernel per batch phase.

On CUDA:
- decode-only batches -> `decode` (default `triton_decode`; `fa2_varlen` or `sdpa` without Triton);
- batches with prefill -> `prefill`: with `sdpa` (the default) each prefill request is one SDPA
  call (cuDNN for fresh prompts) and the batch's decode requests, if any, go to the decode kernel
  in one launch; when more than `varlen_above` requests need prefill, or with
  `prefill="fa2_varlen"`, the whole batch is one FA2 varlen launch instead.
On the CPU the default decode kernel is `torch_sdpa_ref` and prefill goes through `sdpa`'s
per-request path (both plain torch); an explicit `decode="triton_decode"` also works there
under the Triton interpreter, which is how the CPU tests cover the mixed-batch split.
Each sub-backend shares the cache; per-step index tensors are built once per metadata object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattention.attention.base import (
    AttentionMetadata,
    KVCacheView,
    get_backend_class,
    register_backend,
)
from vattention.attention.contiguous import ContiguousBackend
from vattention.attention.sdpa import prefer_cudnn, sdpa_requests
from vattention.attention.triton_decode import TritonDecodeBackend, triton_usable

_DECODE_CHOICES = ("triton_decode", "fa2_varlen", "sdpa", "flex", "torch_sdpa_ref")
_PREFILL_CHOICES = ("sdpa", "fa2_varlen")


@dataclass(frozen=True)
class _Split:
    """A mixed batch cut into prefill requests and decode requests (rows, slots, lengths)."""

    prefill: list[int]
    decode: list[int]
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
        cuda = self.device.type == "cuda"
        fa2_ok = cuda and self.dtype in (torch.float16, torch.bfloat16)
        fa2_ok = fa2_ok and head_dim <= 256 and not head_dim % 8
        if prefill == "fa2_varlen" and not fa2_ok:
            raise ValueError(f"fa2_varlen cannot run this cache ({self.device}, {self.dtype})")
        self._varlen = get_backend_class("fa2_varlen")(*args) if fa2_ok else None
        if decode is None:
            pow2 = head_dim >= 16 and not head_dim & (head_dim - 1)
            if cuda and pow2 and triton_usable(self.device) is None:
                decode = "triton_decode"
            elif cuda:
                decode = "fa2_varlen" if fa2_ok else "sdpa"
            else:
                decode = "torch_sdpa_ref"
        self._decode = get_backend_class(decode)(*args)
        self.prefill = prefill
        self.varlen_above = varlen_above

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.check_q(q, meta)
        if meta.is_decode_only:
            return self._decode.attend(layer, q, meta)
        split = self._plan(meta, "auto_split", lambda: self._split(meta))
        if self._varlen is not None and (
            self.prefill == "fa2_varlen" or len(split.prefill) > self.varlen_above
        ):
            return self._varlen.attend(layer, q, meta)
        k_cache, v_cache = self.layer_kv(layer)
        out = torch.empty_like(q)
        with prefer_cudnn(q.is_cuda):
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
                    q, k_cache, v_cache, meta, self.starts(meta), split.decode, self.scale, out
                )
        return out

    def _split(self, meta: AttentionMetadata) -> _Split:
        prefill = [i for i, n in enumerate(meta.query_lens_host) if n > 1]
        decode = [i for i, n in enumerate(meta.query_lens_host) if n == 1]
        if not decode:
            return _Split(prefill, decode, None, None, None, 0)
        starts = self.starts(meta)
        dev = meta.slots.device
        rows = torch.tensor([starts[i] for i in decode], dtype=torch.int64)
        rows = rows.to(dev, non_blocking=True)
        idx = torch.tensor(decode, dtype=torch.int64).to(dev, non_blocking=True)
        max_len = max(meta.seq_lens_host[i] for i in decode)
        return _Split(prefill, decode, rows, meta.slots[idx], meta.seq_lens[idx], max_len)
