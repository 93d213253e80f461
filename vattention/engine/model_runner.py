"""The model runner: one forward pass per scheduler step.

Per step, `execute(out, reserve, prev)`:
1. builds the token ids and `AttentionMetadata` once (host lists, one non-blocking device copy
   each: nothing on this path waits for queued GPU work, or async scheduling would stall); a
   placeholder token (sampled by the previous step, `prev`, not yet copied to the host) is
   filled in on the device from `prev`'s sampled ids, so step i+1 can launch before step i's
   tokens reach the host;
2. runs the model: a captured CUDA graph for decode-only batches (when enabled), else eagerly,
   and computes logits for the sampling rows only;
3. joins the cache's previous mapping job and hands it the lengths the *next* step will need
   (`step_async`), so page mapping runs on the cache's background thread while this step's
   kernels (queued above) run;
4. samples, and starts copying the sampled ids to pinned host memory (`StepResult`), so reading
   them later waits for this step only, not for a step launched after it.

CUDA graphs are captured once per batch-size bucket for decode-only batches. They stay valid for
the whole run because the KV cache's tensors never move (the virtual range is reserved once);
the graphs read per-step metadata from static buffers that `execute` refills. Padding rows of a
bucket point at a dedicated dummy slot that has one backed token, so they read and write only
memory that is mapped and belongs to nobody.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from vattention.attention.base import AttentionBackend, AttentionMetadata
from vattention.engine.logprobs import HostLogprobs
from vattention.engine.request import PLACEHOLDER
from vattention.engine.sampler import Sampler, SamplerOutput, SamplingMetadata
from vattention.engine.scheduling import SchedulerOutput
from vattention.memory.errors import OutOfKVMemory
from vattention.models.llama import LlamaForCausalLM


class StepResult:
    """One launched step's sampled ids on the device, copied to pinned host memory behind it.

    `token_ids()` / `logprobs()` wait for this step's copy only (an event), so the host can read
    step i while step i+1 runs."""

    def __init__(self, out: SchedulerOutput, sampled: SamplerOutput) -> None:
        self.out = out
        self.sampled = sampled
        self._event: torch.cuda.Event | None = None
        tensors = [sampled.token_ids]
        if sampled.logprobs is not None:
            lp = sampled.logprobs
            tensors += [lp.sampled, lp.top_ids, lp.top_values]
        if sampled.token_ids.is_cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors, strict=True):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            tensors = host
        self._host = tensors

    def _wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def token_ids(self) -> list[int]:
        self._wait()
        return self._host[0].tolist()  # type: ignore[no-any-return]

    def logprobs(self) -> HostLogprobs | None:
        if len(self._host) == 1:
            return None
        self._wait()
        return HostLogprobs(*(t.tolist() for t in self._host[1:]))


def _placeholders(
    ids: list[int], rows_start: list[int], out: SchedulerOutput, prev: StepResult | None
) -> tuple[list[int], list[int]]:
    """(positions in `ids`, rows of `prev`'s sampled ids) of the placeholder tokens in `ids`.

    `rows_start[i]` is where row i's tokens begin in `ids`. A placeholder can only be a row's
    first new token (decode) and must be sampled by `prev`."""
    pos: list[int] = []
    src: list[int] = []
    where: dict[int, int] | None = None
    for i, row in enumerate(out.scheduled):
        if ids[rows_start[i]] != PLACEHOLDER:
            continue
        if where is None:
            if prev is None:
                raise RuntimeError("a row's input token is still in flight, but no step ran")
            where = {id(s.request): j for j, s in enumerate(prev.out.sampling)}
        j = where.get(id(row.request))
        if j is None:
            raise RuntimeError(f"request {row.request.request_id}: in-flight token not in prev")
        pos.append(rows_start[i])
        src.append(j)
    return pos, src


def default_graph_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets for decode graphs: 1, 2, 4, 8, then every 8 up to `max_num_seqs`."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class ModelRunner:
    """Runs a model over a KV cache through an attention backend, step by step."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        cache: Any,
        attn: AttentionBackend,
        sampler: Sampler,
        device: torch.device,
        max_model_len: int,
        graph_sizes: Sequence[int] = (),
        dummy_slot: int | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.attn = attn
        self.sampler = sampler
        self.device = device
        self.max_model_len = max_model_len
        self.block_size = int(getattr(cache, "block_size", 0)) if attn.paged else 0
        self.graphs: _DecodeGraphs | None = None
        self.join_seconds = 0.0  # spent joining the cache's background mapping (a benchmark stat)
        if graph_sizes:
            if device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            if dummy_slot is None:
                raise ValueError("CUDA graphs need a dummy slot for padding rows")
            self.graphs = _DecodeGraphs(self, sorted(set(graph_sizes)), dummy_slot)

    # -- one step ---------------------------------------------------------------------------
    def prepare(
        self, out: SchedulerOutput, prev: StepResult | None = None
    ) -> tuple[torch.Tensor, AttentionMetadata]:
        rows = out.scheduled
        ids: list[int] = []
        starts: list[int] = []
        for row in rows:
            starts.append(len(ids))
            ids.extend(row.token_ids())
        slots = [row.slot for row in rows]
        tables = self.cache.block_tables(slots) if self.attn.paged else None
        meta = AttentionMetadata.build(
            slots,
            [row.start for row in rows],
            [row.num_new_tokens for row in rows],
            self.device,
            block_tables=tables,
            block_size=self.block_size,
        )
        input_ids = torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True)
        self.fill_placeholders(input_ids, *_placeholders(ids, starts, out, prev), prev)
        return input_ids, meta

    def fill_placeholders(
        self, input_ids: torch.Tensor, pos: list[int], src: list[int], prev: StepResult | None
    ) -> None:
        """`input_ids[pos] = prev's sampled ids[src]`, on the device (stream-ordered)."""
        if not pos or prev is None:
            return
        dev = input_ids.device
        pos_t = torch.tensor(pos, dtype=torch.int64).to(dev, non_blocking=True)
        src_t = torch.tensor(src, dtype=torch.int64).to(dev, non_blocking=True)
        input_ids[pos_t] = prev.sampled.token_ids[src_t].to(input_ids.dtype)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, reserve: Sequence[int] = (), prev: StepResult | None = None
    ) -> StepResult:
        """Launch the step's forward pass and sampling; returns without waiting for the GPU.

        `reserve`: token counts of the requests expected to be admitted next; a virtual cache
        prepares free slots for them in the background (eager mapping), off the critical path.
        `prev`: the step launched before this one, if its sampled ids may still be in flight
        (its rows' requests hold placeholders that this step feeds)."""
        rows = out.scheduled
        if not rows:
            raise ValueError("execute() needs a non-empty SchedulerOutput")
        decode_only = all(r.num_new_tokens == 1 for r in rows)
        if self.graphs is not None and decode_only and len(rows) <= self.graphs.max_size:
            logits = self.graphs.run(out, prev)
        else:
            input_ids, meta = self.prepare(out, prev)
            hidden = self.model(input_ids, meta.token_positions, meta, self.attn)
            sample_rows = [i for i, r in enumerate(rows) if r.sample]
            if len(sample_rows) == len(rows):
                index = (meta.query_start_loc[1:] - 1).long()
            else:
                ends = [int(x) - 1 for x in _cumsum([r.num_new_tokens for r in rows])]
                index = torch.tensor([ends[i] for i in sample_rows], dtype=torch.int64)
                index = index.to(self.device, non_blocking=True)  # never waits for the GPU
            logits = self.model.compute_logits(hidden[index])
        # The step's kernels are queued: map the next step's pages while they run. Started
        # after the launch so the mapping thread never competes with it for the interpreter.
        if (out.next_lengths or reserve) and hasattr(self.cache, "step_async"):
            t0 = time.perf_counter()
            self.join_mapping()  # the previous step's job: its shortage is the scheduler's
            self.join_seconds += time.perf_counter() - t0
            self.cache.step_async(out.next_lengths, reserve)
        requests = [r.request for r in rows if r.sample]
        if not requests:  # only unfinished prefill chunks: nothing to sample
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return StepResult(out, SamplerOutput(empty, None))
        smeta = SamplingMetadata.for_requests(requests, self.device)
        return StepResult(out, self.sampler(logits, smeta))

    def join_mapping(self) -> None:
        """Wait for the background mapping of `step_async`; its shortage is not an error here
        (the scheduler backs every row itself and preempts when memory is short)."""
        wait = getattr(self.cache, "wait", None)
        if wait is None:
            return
        with contextlib.suppress(OutOfKVMemory):
            wait()


def _cumsum(xs: list[int]) -> list[int]:
    total, out = 0, []
    for x in xs:
        total += x
        out.append(total)
    return out


class _DecodeGraphs:
    """CUDA graphs of the decode forward pass (model + logits), one per batch-size bucket."""

    def __init__(self, runner: ModelRunner, sizes: list[int], dummy_slot: int) -> None:
        self.runner = runner
        self.sizes = sizes
        self.max_size = sizes[-1]
        self.dummy_slot = dummy_slot
        dev = runner.device
        n = self.max_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), dummy_slot, dtype=torch.int32, device=dev)
        self.token_slots = torch.full((n,), dummy_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables: torch.Tensor | None = None
        self.slot_mapping: torch.Tensor | None = None
        self.dummy_row: list[int] = []
        if runner.attn.paged:
            bs = runner.block_size
            width = -(-runner.max_model_len // bs)
            self.dummy_row = list(runner.cache.block_table(dummy_slot))
            table = (self.dummy_row + [self.dummy_row[0]] * width)[:width]
            self.block_tables = torch.tensor([table] * n, dtype=torch.int32, device=dev)
            self.slot_mapping = torch.full((n,), table[0] * bs, dtype=torch.int64, device=dev)
        # Two pinned staging buffers, used in turn: when step i+1 is filled, step i-1 (the
        # other user of its buffer) has finished, so its copies have too.
        self.pinned = torch.empty((2, 4, n), dtype=torch.int64, pin_memory=True)
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.metas: dict[int, AttentionMetadata] = {}
        self._capture()

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slots=self.slots[:b],
            query_start_loc=self.query_start[: b + 1],
            seq_lens=self.seq_lens[:b],
            context_lens=self.context_lens[:b],
            token_slots=self.token_slots[:b],
            token_positions=self.positions[:b],
            max_query_len=1,
            max_seq_len=self.runner.max_model_len,
            slots_host=[self.dummy_slot] * b,
            query_lens_host=[1] * b,
            seq_lens_host=[self.runner.max_model_len] * b,
            block_tables=None if self.block_tables is None else self.block_tables[:b],
            slot_mapping=None if self.slot_mapping is None else self.slot_mapping[:b],
            block_size=self.runner.block_size,
        )

    def _forward(self, b: int) -> torch.Tensor:
        meta = self.metas[b]
        model = self.runner.model
        hidden = model(self.input_ids[:b], self.positions[:b], meta, self.runner.attn)
        return model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self.metas[b] = self._meta(b)
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: compile kernels, settle allocator
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def run(self, out: SchedulerOutput, prev: StepResult | None = None) -> torch.Tensor:
        rows = out.scheduled
        n = len(rows)
        b = next(s for s in self.sizes if s >= n)
        pad = b - n
        ids = [r.request.all_token_ids[r.start] for r in rows]
        starts = [r.start for r in rows]
        host = self.pinned[self._turn]
        self._turn ^= 1
        # One host tensor write for all rows (padding rows: token 0 at position 0 of the dummy).
        host[:4, :b] = torch.tensor(
            [
                ids + [0] * pad,
                starts + [0] * pad,
                [r.slot for r in rows] + [self.dummy_slot] * pad,
                [r.context_len for r in rows] + [1] * pad,
            ],
            dtype=torch.int64,
        )
        self.input_ids[:b].copy_(host[0, :b], non_blocking=True)
        self.positions[:b].copy_(host[1, :b], non_blocking=True)
        self.slots[:b].copy_(host[2, :b], non_blocking=True)
        self.token_slots[:b].copy_(host[2, :b], non_blocking=True)
        self.seq_lens[:b].copy_(host[3, :b], non_blocking=True)
        self.context_lens[:b].copy_(host[1, :b], non_blocking=True)
        if self.block_tables is not None and self.slot_mapping is not None:
            bs = self.runner.block_size
            width = self.block_tables.shape[1]
            tables = self.runner.cache.block_tables([r.slot for r in rows])
            fill = self.dummy_row[0]
            padded = [list(t) + [fill] * (width - len(t)) for t in tables]
            padded += [[fill] * width] * (b - n)
            mapping = [
                t[r.start // bs] * bs + r.start % bs for t, r in zip(padded, rows, strict=False)
            ]
            mapping += [fill * bs] * (b - n)
            self.block_tables[:b].copy_(torch.tensor(padded, dtype=torch.int32), non_blocking=True)
            self.slot_mapping[:b].copy_(torch.tensor(mapping, dtype=torch.int64), non_blocking=True)
        self.runner.fill_placeholders(
            self.input_ids, *_placeholders(ids, list(range(n)), out, prev), prev
        )
        self.graphs[b].replay()
        return self.logits[b][:n]
