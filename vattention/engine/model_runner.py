"""The model runner: one forward pass per scheduler step.

Per step, `execute(out, reserve, prev)`:
1. builds the token ids and `AttentionMetadata` once (host lists, one non-blocking device copy
   each: nothing on this path waits for queued GPU work, or async scheduling would stall); a
   placeholder token (sampled by the previous step, `prev`, not yet copied to the host) is
   filled in on the device from `prev`'s sampled ids, so step i+1 can launch before step i's
   tokens reach the host;
2. runs the model: a captured CUDA graph (`cuda_graphs`: decode-only batches by batch size,
   mixed prefill/decode batches by token bucket) when enabled and the step fits one, else
   eagerly; logits are computed for the sampling rows only, plus, for requests that asked for
   prompt log-probabilities, the rows listed in `SchedulerOutput.prompt_logprobs` (such a step
   always runs eagerly: a graph computes only the sampling rows' logits), in bounded slices
   (`logprobs.prompt_logprobs`); a step without such rows pays one check;
3. joins the cache's previous mapping job and hands it the lengths the *next* step will need
   (`step_async`), so page mapping runs on the cache's background thread while this step's
   kernels (queued above) run;
4. samples, and starts copying the sampled ids (and log-probabilities) to pinned host memory
   (`StepResult`), so reading them later waits for this step only, not for a step launched
   after it.

CUDA graphs (see `cuda_graphs`) stay valid for the whole run because the KV cache's tensors
never move; their padding rows point at a dedicated dummy slot that has one backed token.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from vattention.attention.base import AttentionBackend, AttentionMetadata
from vattention.attention.shared_prefix import SharedPrefix
from vattention.engine.cascade import plan_cascade
from vattention.engine.cuda_graphs import DecodeGraphs, MixedGraphs
from vattention.engine.logprobs import HostLogprobs, Logprobs, prompt_logprobs
from vattention.engine.request import PLACEHOLDER
from vattention.engine.sampler import Sampler, SamplerOutput, SamplingMetadata
from vattention.engine.scheduling import SchedulerOutput
from vattention.memory.errors import OutOfKVMemory
from vattention.models.llama import LlamaForCausalLM


class StepResult:
    """One launched step's sampled ids on the device, copied to pinned host memory behind it.

    `token_ids()` / `logprobs()` / `prompt_logprobs()` wait for this step's copy only (an
    event), so the host can read step i while step i+1 runs."""

    def __init__(
        self,
        out: SchedulerOutput,
        sampled: SamplerOutput,
        prompt: Logprobs | None = None,
        pooled: torch.Tensor | None = None,
    ) -> None:
        self.out = out
        self.sampled = sampled
        self._event: torch.cuda.Event | None = None
        tensors = [sampled.token_ids]
        self._lp_at = self._prompt_at = self._pooled_at = 0  # where each group starts (0: none)
        if sampled.logprobs is not None:
            lp = sampled.logprobs
            self._lp_at = len(tensors)
            tensors += [lp.sampled, lp.top_ids, lp.top_values]
        if prompt is not None:
            self._prompt_at = len(tensors)
            tensors += [prompt.sampled, prompt.top_ids, prompt.top_values]
        if pooled is not None:
            self._pooled_at = len(tensors)
            tensors.append(pooled)
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
        return self._group(self._lp_at)

    def prompt_logprobs(self) -> HostLogprobs | None:
        """The step's prompt log-probabilities (rows: `out.prompt_logprobs`' positions)."""
        return self._group(self._prompt_at)

    def pooled(self) -> list[list[float]] | None:
        """The hidden states of the rows `out.pooling` lists (float32), or None."""
        if not self._pooled_at:
            return None
        self._wait()
        return self._host[self._pooled_at].tolist()  # type: ignore[no-any-return]

    def _group(self, at: int) -> HostLogprobs | None:
        if not at:
            return None
        self._wait()
        return HostLogprobs(*(t.tolist() for t in self._host[at : at + 3]))


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
        mixed_sizes: Sequence[int] = (),
        max_num_seqs: int = 0,
        max_graph_prefills: int = 16,
        emulate_graphs: bool = False,
        cascade: bool = False,
    ) -> None:
        self.model = model
        self.vocab_size = int(model.config.vocab_size)  # the logits' width (penalties)
        self.cache = cache
        self.attn = attn
        self.sampler = sampler
        self.device = device
        self.max_model_len = max_model_len
        self.block_size = int(getattr(cache, "block_size", 0)) if attn.paged else 0
        # cascade decoding (`cascade.py`): decode-only steps attend a prefix their rows share
        # once, where the backend can (`supports_cascade`)
        self.cascade = cascade and attn.supports_cascade
        self.cascade_steps = 0  # decode steps that attended a shared prefix once (a stat)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.join_seconds = 0.0  # spent joining the cache's background mapping (a benchmark stat)
        self.graph_steps = {"decode": 0, "mixed": 0, "eager": 0}  # steps run each way
        # Graphs only where the backend can run such a step from device tensors alone (else
        # it would read the padding that a captured step's host lists hold): eager otherwise.
        block_m = getattr(attn, "mixed_graph_block_m", None)
        mixed_sizes = sorted(set(mixed_sizes)) if block_m else []
        graph_sizes = graph_sizes if attn.supports_decode_graphs else ()
        if graph_sizes or mixed_sizes:
            if device.type != "cuda" and not emulate_graphs:
                raise ValueError("CUDA graphs need a CUDA device")
            if dummy_slot is None:
                raise ValueError("CUDA graphs need a dummy slot for padding rows")
            # emulate_graphs (tests on the CPU): the same static buffers and padding, with the
            # forward pass run in place of each replay.
            pool = None if emulate_graphs else torch.cuda.graph_pool_handle()
            if mixed_sizes and block_m:  # larger graphs first: decode graphs reuse their memory
                if max_num_seqs < 1:
                    raise ValueError("mixed CUDA graphs need max_num_seqs")
                self.mixed_graphs = MixedGraphs(
                    self, mixed_sizes, max_num_seqs, dummy_slot, block_m, max_graph_prefills, pool
                )
            if graph_sizes:
                self.graphs = DecodeGraphs(self, sorted(set(graph_sizes)), dummy_slot, pool)

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
        tables: Any = None
        if self.attn.paged:  # one numpy index of the cache's table array when it has one
            array = getattr(self.cache, "block_table_array", None)
            tables = array(slots) if array is not None else self.cache.block_tables(slots)
        meta = AttentionMetadata.build(
            slots,
            [row.start for row in rows],
            [row.num_new_tokens for row in rows],
            self.device,
            block_tables=tables,
            block_size=self.block_size,
        )
        if self.cascade and meta.is_decode_only:
            meta.prefix = self.shared_prefix(slots, meta.seq_lens_host)
        input_ids = torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True)
        self.fill_placeholders(input_ids, *_placeholders(ids, starts, out, prev), prev)
        return input_ids, meta

    def shared_prefix(self, slots: list[int], seq_lens: Sequence[int]) -> SharedPrefix | None:
        """An eager decode step's `SharedPrefix` (`cascade.plan_cascade`), or None."""
        plan = plan_cascade(self.cache, slots, seq_lens, self.attn.paged)
        if plan is None:
            return None
        self.cascade_steps += 1
        lens, tokens, leader = plan
        dev = self.device
        both = torch.tensor([tokens, leader], dtype=torch.int32).to(dev, non_blocking=True)
        lens_t = torch.from_numpy(lens).to(dev, non_blocking=True)
        return SharedPrefix(lens_t, both[:1], both[1:], tokens)

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
        prompt_rows = out.prompt_logprobs  # None but for steps with such rows: always eager
        prompt: Logprobs | None = None
        pooled: torch.Tensor | None = None
        eager_only = prompt_rows is not None or out.pooling is not None  # graphs give logits
        if (
            self.graphs is not None
            and decode_only
            and len(rows) <= self.graphs.max_size
            and not eager_only
        ):
            logits = self.graphs.run(out, prev)
            self.graph_steps["decode"] += 1
        elif (
            self.mixed_graphs is not None
            and not decode_only
            and not eager_only
            and self.mixed_graphs.fits(out)
        ):
            logits = self.mixed_graphs.run(out, prev)
            self.graph_steps["mixed"] += 1
        else:
            self.graph_steps["eager"] += 1
            input_ids, meta = self.prepare(out, prev)
            hidden = self.model(input_ids, meta.token_positions, meta, self.attn)
            sample_rows = [i for i, r in enumerate(rows) if r.sample]
            if len(sample_rows) == len(rows):
                index = (meta.query_start_loc[1:] - 1).long()
            else:
                ends = [int(x) - 1 for x in _cumsum([r.num_new_tokens for r in rows])]
                index = torch.tensor([ends[i] for i in sample_rows], dtype=torch.int64)
                index = index.to(self.device, non_blocking=True)  # never waits for the GPU
            last = hidden[index]
            logits = self.model.compute_logits(last)
            if prompt_rows is not None:
                prompt = self._prompt_logprobs(hidden, out)
            if out.pooling is not None:  # embedding requests: their prompt's last token
                pick = torch.tensor(out.pooling, dtype=torch.int64)
                pick = pick.to(self.device, non_blocking=True)
                pooled = last[pick].float()
        requests = [r.request for r in rows if r.sample]
        if not requests:  # only unfinished prefill chunks: nothing to sample
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            result = StepResult(out, SamplerOutput(empty, None), prompt)
        else:
            smeta = SamplingMetadata.for_requests(requests, self.device, self.vocab_size)
            result = StepResult(out, self.sampler(logits, smeta), prompt, pooled)
        # The step's kernels are queued: map the next step's pages while they run (inline, or
        # on the cache's thread). Started after the launch so that it never delays it.
        if (out.next_lengths or reserve) and hasattr(self.cache, "step_async"):
            t0 = time.perf_counter()
            self.join_mapping()  # the previous step's job: its shortage is the scheduler's
            self.join_seconds += time.perf_counter() - t0
            self.cache.step_async(out.next_lengths, reserve)
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, out: SchedulerOutput) -> Logprobs:
        """Log-probabilities of the prompt positions `out.prompt_logprobs` lists (in order),
        from the step's hidden states `hidden` (all of its tokens' rows)."""
        rows = out.scheduled
        starts = _cumsum([0] + [r.num_new_tokens for r in rows])  # each row's first hidden row
        index: list[int] = []
        targets: list[int] = []
        k = 0
        for pr in out.prompt_logprobs or ():
            row = rows[pr.row]
            at = starts[pr.row] + pr.first - 1 - row.start  # the token before position `first`
            index.extend(range(at, at + pr.num_positions))
            targets.extend(row.request.prompt_token_ids[pr.first : pr.end])
            k = max(k, row.request.params.prompt_logprobs or 0)
        dev = self.device
        index_t = torch.tensor(index, dtype=torch.int64).to(dev, non_blocking=True)
        targets_t = torch.tensor(targets, dtype=torch.int64).to(dev, non_blocking=True)
        return prompt_logprobs(
            self.model.compute_logits, hidden, index_t, targets_t, k, self.vocab_size
        )

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
