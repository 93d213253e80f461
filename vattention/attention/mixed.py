"""Mixed steps (prefill chunks and decode tokens in one batch) as two launches per layer.

A mixed step's attention is cut by query length, whatever the batch:
- rows with one new token (decodes, or 1-token chunks) go to the split-K decode kernel in one
  launch (`decode_kernels`), which shares each K/V load across a GQA group;
- requests with more new tokens go to one varlen prefill launch.

`MixedPlan` holds that cut as device tensors. The eager path builds one per step from the host
lists (`plan_mixed`); the CUDA-graph path (`ModelRunner`'s mixed graphs) keeps one with fixed
shapes in static buffers and refills it every step, padding it so that every padding entry is
harmless: padding decode rows read request `pad_request` (the dummy slot, one backed token) and
write query row `pad_row` (a padding token); padding tiles are sentinels (`tile_req = -1`).
Invariant: `decode_rows`/`decode_idx` name distinct real rows/requests, except padding entries,
which all point at `pad_row`/`pad_request`; no tile names a padding request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattention.attention.base import AttentionMetadata


@dataclass(frozen=True)
class MixedPlan:
    """The decode/prefill cut of one mixed step (device tensors, int64 indices, int32 tiles)."""

    decode_rows: torch.Tensor | None  # [D] rows of q with one new token
    decode_idx: torch.Tensor | None  # [D] their request index in the batch
    decode_max_len: int  # >= every decode row's seq_len (sizes the decode grid)
    decode: list[int]  # host: request indices with one new token (eager only)
    prefill: list[int]  # host: request indices with more than one new token (eager only)
    tile_req: torch.Tensor | None  # [N] request index of each prefill tile; -1 = sentinel
    tile_row: torch.Tensor | None  # [N] first query row of each tile within its request


def h2d(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device without waiting for queued GPU work."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def plan_mixed(
    meta: AttentionMetadata, block_m: int | None, tiled: list[int] | None = None
) -> MixedPlan:
    """The eager plan of a batch with prefill rows; with `block_m`, tiles of the requests
    `tiled` (default: every prefill request) for the prefill kernel."""
    q_lens, s_lens = meta.query_lens_host, meta.seq_lens_host
    dev = meta.slots.device
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    prefill = [i for i, n in enumerate(q_lens) if n > 1]
    tiled = prefill if tiled is None else tiled
    rows = idx = None
    if decode:
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        packed = h2d([starts[i] for i in decode] + decode, torch.int64, dev)
        rows, idx = packed[: len(decode)], packed[len(decode) :]
    tile_req = tile_row = None
    if block_m is not None and tiled:
        from vattention.attention.prefill_kernels import prefill_tiles

        req, row = prefill_tiles(tiled, q_lens, s_lens, block_m)
        packed = h2d(req + row, torch.int32, dev)
        tile_req, tile_row = packed[: len(req)], packed[len(req) :]
    return MixedPlan(
        decode_rows=rows,
        decode_idx=idx,
        decode_max_len=max((s_lens[i] for i in decode), default=1),
        decode=decode,
        prefill=prefill,
        tile_req=tile_req,
        tile_row=tile_row,
    )
