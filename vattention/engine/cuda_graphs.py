"""CUDA graphs of whole steps (model forward + logits of the sampling rows).

- `DecodeGraphs`: decode-only batches, one graph per batch-size bucket (1, 2, 4, 8, 16, ...).
- `MixedGraphs`: batches mixing prefill chunks and decodes, one graph per token bucket (e.g.
  256 ... 2048 new tokens), when the attention backend can run a mixed step from a fixed-shape
  plan (`AttentionBackend.mixed_graph_block_m`): the decode kernel over every 1-token row plus
  the Triton prefill kernel over sentinel-padded tiles (see `attention/mixed.py`).
The graphs stay valid for the whole run because the KV cache's tensors never move (the virtual
range is reserved once; the paged pools are allocated once). Every per-step input lives in
static device buffers (`_Staging`): the host builds them with numpy and sends them with one
host-to-device copy per dtype, never waiting for queued GPU work.
Padding, so that a graph only touches memory that is mapped and belongs to nobody:
- padding tokens write their K/V to position 0 of the dummy slot (paged: the padding block 0)
  and their rows of q/out are scratch;
- padding requests of a mixed graph sit on the dummy slot with one backed token; padding decode
  rows read that request and write a padding token's row; padding tiles are sentinels; padding
  sampling rows read a padding token's row (their logits are never used).
A mixed step therefore needs at least one padding token: its bucket is the smallest one with
more than its tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vattention.attention.base import AttentionMetadata
from vattention.attention.mixed import MixedPlan
from vattention.attention.shared_prefix import SharedPrefix
from vattention.engine.cascade import CASCADE_MIN_ROWS, plan_cascade
from vattention.engine.scheduling import SchedulerOutput

if TYPE_CHECKING:
    from vattention.engine.model_runner import ModelRunner, StepResult

_NP = {torch.int64: np.int64, torch.int32: np.int32}


class _Staging:
    """Named static device buffers, grouped by dtype, refilled by one copy per dtype."""

    def __init__(self, fields: dict[str, tuple[torch.dtype, tuple[int, ...]]], device: Any):
        self.layout: dict[torch.dtype, list[tuple[str, int, tuple[int, ...]]]] = {}
        self.sizes: dict[torch.dtype, int] = {}
        for name, (dtype, shape) in fields.items():
            at = self.sizes.get(dtype, 0)
            self.layout.setdefault(dtype, []).append((name, at, shape))
            self.sizes[dtype] = at + int(np.prod(shape))
        self.device_buf = {
            dt: torch.zeros(n, dtype=dt, device=device) for dt, n in self.sizes.items()
        }
        self.pin = torch.device(device).type == "cuda"
        self.views: dict[str, torch.Tensor] = {}
        for dt, entries in self.layout.items():
            for name, at, shape in entries:
                n = int(np.prod(shape))
                self.views[name] = self.device_buf[dt][at : at + n].view(shape)

    def fill(self, values: dict[str, np.ndarray]) -> None:
        """Copy every field (each given whole, any array-like of its shape) to the device."""
        for dt, entries in self.layout.items():
            host = torch.empty(self.sizes[dt], dtype=dt, pin_memory=self.pin)
            arr = host.numpy()
            for name, at, shape in entries:
                n = int(np.prod(shape))
                arr[at : at + n] = np.asarray(values[name], dtype=_NP[dt]).reshape(-1)
            # A fresh pinned block per step: torch's host allocator reuses it only after this
            # copy is done, so no later step overwrites it in flight.
            self.device_buf[dt].copy_(host, non_blocking=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]


def _pad(values: Sequence[int] | np.ndarray, size: int, fill: int) -> np.ndarray:
    out = np.full(size, fill, dtype=np.int64)
    out[: len(values)] = values
    return out


class _Replay:
    """A captured graph and its output; without CUDA (`pool is None`: tests on the CPU) the
    forward pass itself, run on the same static buffers, stands in for the replay."""

    def __init__(self, graph: torch.cuda.CUDAGraph | None, forward: Callable[[], torch.Tensor],
                 output: torch.Tensor | None) -> None:  # fmt: skip
        self.graph, self.forward, self.output = graph, forward, output

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        assert self.output is not None
        return self.output


@functools.cache
def _warmup_stream(device: int) -> torch.cuda.Stream:
    """The stream captures warm up on: one per device for the process. cuBLAS keeps a workspace
    for every stream it ran on until the process ends (64 MiB each on the H200), so a fresh
    stream per capture left one behind for each engine created."""
    return torch.cuda.Stream(device)


@torch.inference_mode()
def _capture(
    sizes: Sequence[int],
    forward: Callable[[int], torch.Tensor],
    pool: Any,
    prepare: Callable[[int], object],
) -> dict[int, _Replay]:
    """One graph per size, largest first (so smaller ones reuse its memory), in `pool`.

    `prepare(b)` fills the static buffers with an all-padding step of size `b` before its
    warm-up runs (padding entries may depend on the size). Without CUDA (`pool is None`) the
    warm-up still runs once per size, so the same padding is exercised."""
    if pool is None:
        for b in sizes:
            prepare(b)
            forward(b)
        return {b: _Replay(None, lambda b=b: forward(b), None) for b in sizes}  # type: ignore[misc]
    replays: dict[int, _Replay] = {}
    side = _warmup_stream(torch.cuda.current_device())
    with _no_garbage_collection():
        for b in sorted(sizes, reverse=True):
            replays[b] = _capture_one(b, forward, pool, prepare, side)
    torch.cuda.synchronize()
    return replays


@contextlib.contextmanager
def _no_garbage_collection() -> Iterator[None]:
    """Collect garbage now and not again until the block ends: a collection during a capture
    could free another engine's CUDA memory or events (not permitted while a stream captures:
    the capture is invalidated), so garbage left by earlier engines in the process goes first."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _capture_one(
    b: int,
    forward: Callable[[int], torch.Tensor],
    pool: Any,
    prepare: Callable[[int], object],
    side: torch.cuda.Stream,
) -> _Replay:
    """Warm up size `b` on `side`, then capture its graph in `pool`."""
    prepare(b)
    side.wait_stream(torch.cuda.current_stream())  # the buffers' copies are done
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: compile kernels, settle the allocator
            forward(b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward(b)
    return _Replay(graph, lambda b=b: forward(b), output)  # type: ignore[misc]


class _Graphs:
    """What both kinds share: the runner, the dummy slot, paged tables, placeholder feeding."""

    buf: _Staging  # set by each kind before its capture
    metas: dict[int, AttentionMetadata]

    def __init__(self, runner: ModelRunner, dummy_slot: int, pool: Any) -> None:
        self.runner = runner
        self.dummy_slot = dummy_slot
        self.emulated = pool is None
        self.paged = runner.attn.paged
        self.block_size = runner.block_size
        self.width = -(-runner.max_model_len // runner.block_size) if self.paged else 0

    def tables(self, slots: Sequence[int], rows: int) -> np.ndarray:
        """Block tables of `slots` padded to `rows` rows of the padding block (paged only)."""
        out = np.zeros((rows, self.width), dtype=np.int32)
        if slots:
            out[: len(slots)] = self.runner.cache.block_table_array(slots)[:, : self.width]
        return out

    def slot_mapping(self, tables: np.ndarray, req: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Flat cache row `block * block_size + offset` of tokens (request index, position)."""
        bs = self.block_size
        return tables[req, pos // bs].astype(np.int64) * bs + pos % bs

    def meta(self, b: int) -> AttentionMetadata:
        """Bucket `b`'s metadata. Emulated, a new object per run: backends build their per-step
        plans once per metadata object, and a replay redoes the plan's recorded device work."""
        return dataclasses.replace(self.metas[b]) if self.emulated else self.metas[b]

    def feed(
        self, ids: list[int], starts: list[int], out: SchedulerOutput, prev: StepResult | None
    ) -> None:
        """Put `prev`'s sampled ids into the placeholder tokens of `ids` (row i at `starts[i]`)
        in the static input buffer, on the device."""
        from vattention.engine.model_runner import _placeholders

        pos, src = _placeholders(ids, starts, out, prev)
        self.runner.fill_placeholders(self.buf["ids"], pos, src, prev)


class DecodeGraphs(_Graphs):
    """Decode-only steps, one graph per batch-size bucket. With cascade decoding
    (`runner.cascade`) a second set, captured with a `SharedPrefix` in the metadata, covers the
    buckets `cascade_sizes(sizes)`; a step replays it only when `plan_cascade` finds a group, so
    steps that share nothing run the plain graphs and pay nothing for the option."""

    def __init__(self, runner: ModelRunner, sizes: list[int], dummy_slot: int, pool: Any) -> None:
        super().__init__(runner, dummy_slot, pool)
        self.sizes = sorted(sizes)
        self.max_size = n = self.sizes[-1]
        fields: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            "ids": (torch.int64, (n,)),
            "pos": (torch.int64, (n,)),
            "tok_slots": (torch.int64, (n,)),
            "slots": (torch.int32, (n,)),
            "seq_lens": (torch.int32, (n,)),
            "ctx": (torch.int32, (n,)),
        }
        if self.paged:
            fields["slot_mapping"] = (torch.int64, (n,))
            fields["tables"] = (torch.int32, (n, self.width))
        self.cascade_sizes = cascade_sizes(self.sizes) if runner.cascade else []
        if self.cascade_sizes:  # a shared prefix per step: rows' lengths, [its tokens, leader]
            fields["prefix_lens"] = (torch.int32, (n,))
            fields["prefix"] = (torch.int32, (2,))
        self.buf = _Staging(fields, runner.device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=runner.device)
        self.metas = {b: self._meta(b, False) for b in self.sizes}
        self.cascade_metas = {b: self._meta(b, True) for b in self.cascade_sizes}
        self.cascade_replays = _capture(
            self.cascade_sizes, functools.partial(self._forward, cascade=True), pool,
            lambda b: self._fill(None),
        )  # fmt: skip
        self.replays = _capture(self.sizes, self._forward, pool, lambda b: self._fill(None))

    def _meta(self, b: int, cascade: bool) -> AttentionMetadata:
        buf, max_len = self.buf, self.runner.max_model_len
        return AttentionMetadata(
            slots=buf["slots"][:b],
            query_start_loc=self.query_start[: b + 1],
            seq_lens=buf["seq_lens"][:b],
            context_lens=buf["ctx"][:b],
            token_slots=buf["tok_slots"][:b],
            token_positions=buf["pos"][:b],
            max_query_len=1,
            max_seq_len=max_len,
            slots_host=[self.dummy_slot] * b,
            query_lens_host=[1] * b,
            seq_lens_host=[max_len] * b,
            block_tables=buf["tables"][:b] if self.paged else None,
            slot_mapping=buf["slot_mapping"][:b] if self.paged else None,
            block_size=self.block_size,
            prefix=SharedPrefix(
                buf["prefix_lens"][:b], buf["prefix"][:1], buf["prefix"][1:], max_len
            )
            if cascade
            else None,  # fmt: skip
        )

    def meta(self, b: int, cascade: bool = False) -> AttentionMetadata:
        meta = self.cascade_metas[b] if cascade else self.metas[b]
        return dataclasses.replace(meta) if self.emulated else meta

    def _forward(self, b: int, cascade: bool = False) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.buf["ids"][:b], self.buf["pos"][:b], self.meta(b, cascade),
                       self.runner.attn)  # fmt: skip
        return model.compute_logits(hidden)

    def _fill(self, out: SchedulerOutput | None) -> tuple[list[int], bool]:
        """Fill the buffers for `out`'s rows (None: every row padding); returns the token ids
        and whether the step attends a shared prefix once (the cascade graphs)."""
        rows = out.scheduled if out is not None else []
        n, n_max = len(rows), self.max_size
        ids = np.fromiter((r.request.all_token_ids[r.start] for r in rows), np.int64, n)
        pos = np.fromiter((r.start for r in rows), np.int64, n)
        slots = np.fromiter((r.slot for r in rows), np.int64, n)
        values: dict[str, np.ndarray] = {
            "ids": _pad(np.where(ids < 0, 0, ids), n_max, 0),
            "pos": _pad(pos, n_max, 0),
            "tok_slots": _pad(slots, n_max, self.dummy_slot),
            "slots": _pad(slots, n_max, self.dummy_slot),
            "seq_lens": _pad(pos + 1, n_max, 1),
            "ctx": _pad(pos, n_max, 0),
        }
        if self.paged:
            tables = self.tables(slots.tolist(), n_max)
            req = np.arange(n_max)
            values["tables"] = tables
            values["slot_mapping"] = self.slot_mapping(tables, req, values["pos"])
        plan = None
        if self.cascade_sizes:  # padding rows share nothing; no group: length 0
            if n >= CASCADE_MIN_ROWS:
                plan = plan_cascade(self.runner.cache, slots.tolist(), pos + 1, self.paged)
            lens, tokens, leader = plan if plan is not None else (np.zeros(n, np.int32), 0, 0)
            self.runner.cascade_steps += plan is not None
            values["prefix_lens"] = _pad(lens, n_max, 0)
            values["prefix"] = np.array([tokens, leader], dtype=np.int32)
        self.buf.fill(values)
        return ids.tolist(), plan is not None

    def run(self, out: SchedulerOutput, prev: StepResult | None = None) -> torch.Tensor:
        n = len(out.scheduled)
        ids, cascade = self._fill(out)
        self.feed(ids, list(range(n)), out, prev)  # row i's only token is at position i
        if cascade:
            b = next(s for s in self.cascade_sizes if s >= n)
            return self.cascade_replays[b]()[:n]
        b = next(s for s in self.sizes if s >= n)
        return self.replays[b]()[:n]


def cascade_sizes(sizes: Sequence[int]) -> list[int]:
    """Buckets of the cascade decode graphs: the powers of two from `CASCADE_MIN_ROWS` below
    the largest of `sizes`, and that largest (a cascade step has at least that many rows; a
    graph keeps `[b, vocab]` logits, so a second set as fine as `sizes` would double that
    memory: padding rows cost a decode step little)."""
    top = max(sizes, default=0)
    out = []
    b = CASCADE_MIN_ROWS
    while b < top:
        out.append(b)
        b *= 2
    return out + [top] if top >= CASCADE_MIN_ROWS else []


def mixed_token_sizes(max_tokens: int, max_num_seqs: int, limit: int) -> list[int]:
    """Token buckets of mixed graphs: powers of two from the first above `max_num_seqs` (at
    least 16: a step with every slot decoding plus a chunk fits) up to `limit`, capped by the
    step's token budget `max_tokens` (+1 for the padding token)."""
    top = min(limit, max_tokens + 1)
    size = 16
    while size <= max_num_seqs:
        size *= 2
    sizes = []
    while size < top:
        sizes.append(size)
        size *= 2
    if top > max_num_seqs + 1 and top >= 16 and (not sizes or sizes[-1] < top):
        sizes.append(top)
    return sizes


class MixedGraphs(_Graphs):
    """Mixed prefill/decode steps of up to `max(sizes) - 1` new tokens, one graph per token
    bucket; at most `max_prefills` requests with more than one new token per step."""

    def __init__(
        self,
        runner: ModelRunner,
        sizes: list[int],
        max_num_seqs: int,
        dummy_slot: int,
        block_m: int,
        max_prefills: int,
        pool: Any,
    ) -> None:
        super().__init__(runner, dummy_slot, pool)
        self.sizes = sorted(sizes)
        self.max_tokens = t = self.sizes[-1]
        self.num_reqs = nb = max_num_seqs + 1  # at least one padding request (the dummy)
        self.num_decode = d = max_num_seqs
        self.max_prefills = max_prefills
        self.block_m = block_m
        self.num_tiles = {b: b // block_m + max_prefills for b in self.sizes}
        nt = self.num_tiles[t]
        fields: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            "ids": (torch.int64, (t,)),
            "pos": (torch.int64, (t,)),
            "tok_slots": (torch.int64, (t,)),
            "dec_rows": (torch.int64, (d,)),
            "dec_idx": (torch.int64, (d,)),
            "sample": (torch.int64, (d,)),
            "slots": (torch.int32, (nb,)),
            "qsl": (torch.int32, (nb + 1,)),
            "seq_lens": (torch.int32, (nb,)),
            "ctx": (torch.int32, (nb,)),
            "tile_req": (torch.int32, (nt,)),
            "tile_row": (torch.int32, (nt,)),
        }
        if self.paged:
            fields["slot_mapping"] = (torch.int64, (t,))
            fields["tables"] = (torch.int32, (nb, self.width))
        self.buf = _Staging(fields, runner.device)
        self.metas = {b: self._meta(b) for b in self.sizes}
        self.replays = _capture(
            self.sizes, self._forward, pool, lambda b: self._fill(SchedulerOutput(), b)
        )

    def fits(self, out: SchedulerOutput) -> bool:
        rows = out.scheduled
        if len(rows) > self.num_decode:
            return False
        tokens = prefills = 0
        for r in rows:
            tokens += r.num_new_tokens
            prefills += r.num_new_tokens > 1
        return tokens < self.max_tokens and prefills <= self.max_prefills

    def _meta(self, b: int) -> AttentionMetadata:
        buf, nb, max_len = self.buf, self.num_reqs, self.runner.max_model_len
        plan = MixedPlan(
            decode_rows=buf["dec_rows"],
            decode_idx=buf["dec_idx"],
            decode_max_len=max_len,
            decode=[],
            prefill=[],
            tile_req=buf["tile_req"][: self.num_tiles[b]],
            tile_row=buf["tile_row"][: self.num_tiles[b]],
        )
        return AttentionMetadata(
            slots=buf["slots"],
            query_start_loc=buf["qsl"],
            seq_lens=buf["seq_lens"],
            context_lens=buf["ctx"],
            token_slots=buf["tok_slots"][:b],
            token_positions=buf["pos"][:b],
            max_query_len=b,
            max_seq_len=max_len,
            slots_host=[self.dummy_slot] * nb,
            query_lens_host=[b] + [0] * (nb - 1),  # host lists are not read on this path
            seq_lens_host=[max_len] * nb,
            block_tables=buf["tables"] if self.paged else None,
            slot_mapping=buf["slot_mapping"][:b] if self.paged else None,
            block_size=self.block_size,
            mixed=plan,
        )

    def _forward(self, b: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.buf["ids"][:b], self.buf["pos"][:b], self.meta(b), self.runner.attn)
        return model.compute_logits(hidden[self.buf["sample"][: min(b, self.num_decode)]])

    def _fill(self, out: SchedulerOutput, b: int) -> tuple[list[int], list[int]]:
        """Fill the buffers for bucket `b`; returns (token ids, first token row of each row)."""
        from vattention.attention.prefill_kernels import pad_tiles, prefill_tiles

        rows = out.scheduled
        n, t_max, nb, d = len(rows), self.max_tokens, self.num_reqs, self.num_decode
        q = np.fromiter((r.num_new_tokens for r in rows), np.int64, n)
        start = np.fromiter((r.start for r in rows), np.int64, n)
        slots = np.fromiter((r.slot for r in rows), np.int64, n)
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q, out=qsl[1:])
        total = int(qsl[-1])
        ids: list[int] = []
        for r in rows:
            ids.extend(r.token_ids())
        ids_np = np.asarray(ids, dtype=np.int64)
        req_of_tok = np.repeat(np.arange(n), q)
        pos = np.arange(total, dtype=np.int64) - qsl[req_of_tok] + start[req_of_tok]
        pad_row = b - 1  # a padding token (a step has fewer tokens than its bucket)
        decode = np.flatnonzero(q == 1)
        prefill = np.flatnonzero(q > 1).tolist()
        q_list, s_list = q.tolist(), (start + q).tolist()
        req, row = prefill_tiles(prefill, q_list, s_list, self.block_m)
        req, row = pad_tiles(req, row, self.num_tiles[self.max_tokens])
        sample = [i for i, r in enumerate(rows) if r.sample]
        values: dict[str, np.ndarray] = {
            "ids": _pad(np.where(ids_np < 0, 0, ids_np), t_max, 0),
            "pos": _pad(pos, t_max, 0),
            "tok_slots": _pad(slots[req_of_tok], t_max, self.dummy_slot),
            "dec_rows": _pad(qsl[decode], d, pad_row),
            "dec_idx": _pad(decode, d, nb - 1),
            "sample": _pad(qsl[1:][sample] - 1, d, pad_row),
            "slots": _pad(slots, nb, self.dummy_slot),
            "qsl": _pad(qsl, nb + 1, total),
            "seq_lens": _pad(start + q, nb, 1),
            "ctx": _pad(start, nb, 0),
            "tile_req": np.asarray(req),
            "tile_row": np.asarray(row),
        }
        if self.paged:
            tables = self.tables(slots.tolist(), nb)
            values["tables"] = tables
            tok_req = _pad(req_of_tok, t_max, nb - 1)
            values["slot_mapping"] = self.slot_mapping(tables, tok_req, values["pos"])
        self.buf.fill(values)
        return ids, qsl[:-1].tolist()

    def run(self, out: SchedulerOutput, prev: StepResult | None = None) -> torch.Tensor:
        """Replay the bucket's graph; returns the logits of the step's sampling rows."""
        tokens = out.num_batched_tokens
        b = next(s for s in self.sizes if s > tokens)
        ids, starts = self._fill(out, b)
        self.feed(ids, starts, out, prev)
        return self.replays[b]()[: len(out.sampling)]
