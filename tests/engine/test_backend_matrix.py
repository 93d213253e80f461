"""Every attention backend x KV cache x layout x graph mode through the real engine.

The backends are enumerated from the registry (`backend_names()`), so a new one joins the matrix
by registering; each runs over the cache kind it declares (`paged`: `PagedKVCache`, else
`VirtualKVCache` in both layouts), eagerly, with decode-only step graphs (`mixed_graph_tokens=0`)
and with mixed-step graphs (the default), async scheduling on. A combination is skipped only
where the backend says it cannot serve it: a declared `decode_only` backend (the engine refuses
it), or a `ValueError` from the backend's constructor over the engine's cache (device, dtype or
shape limits, e.g. FA2 on the CPU). Whatever fails after that fails the test. Graph modes also
check that the runner captures exactly what the backend declares it can run from device
tensors alone (`supports_decode_graphs`, `mixed_graph_block_m`) and runs the rest eagerly.

Workload: 12 requests of seeded prompt lengths from 2 to 300 tokens (128 on the CPU), greedy, EOS
ignored, varied `max_tokens`; a small token budget (prefill chunks mixed with decodes in one step)
and few running requests (the rest queue). Outputs are compared with the same workload through the plainest
backend (`torch_sdpa_ref`, eager, vAttention cache, same device and dtype): equal token for
token, except that from a near-tie of the reference (its two best tokens within `tol`, the other
run taking the second) on, the rest of that request may differ. In float32 no divergence is
allowed; in bfloat16 (GPU) a third of the requests may diverge, each only at a near-tie.

CPU (about 30 s on 2 cores): float32, a smaller model and workload, the Triton kernels under the
interpreter; graph modes are emulated as in `test_cuda_graphs.py` (the runner's static buffers,
padding and plans, with the forward pass in place of each replay) since CUDA graphs do not exist
there, and a graph mode that would run its steps exactly as another case of the backend does
(it captures nothing more) is skipped. GPU (`gpu` marker): the whole matrix in bfloat16 with real
CUDA graphs, and engine create/close cycles that must give back every byte they took.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from llm_helpers import save_tiny

import vattention.engine.llm_engine as llm_engine
from vattention import LLM, SamplingParams
from vattention.attention import backend_names, get_backend_class
from vattention.engine.cuda_graphs import mixed_token_sizes
from vattention.engine.model_runner import ModelRunner, default_graph_sizes
from vattention.engine.outputs import RequestOutput
from vattention.engine.sampler import Sampler
from vattention.engine.scheduling import SchedulerConfig

REFERENCE = "torch_sdpa_ref"
MODES = ("eager", "decode_graphs", "mixed_graphs")
LAYOUTS = ("cross_layer", "cross_layer_kv", "per_layer")
MAX_SEQS = 4  # requests running at once (the others wait)
# dtype -> (near-tie tolerance in log-probability, share of requests that must match whole)
TOLERANCE = {"float32": (0.0, 1.0), "bfloat16": (0.3, 2 / 3)}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Model and workload sizes of one device."""

    layers: int
    prompt_lens: tuple[int, ...]
    max_tokens: tuple[int, int]  # range of `max_tokens` (end excluded)
    batched: int  # a step's token budget: the longer prompts take several chunks
    max_len: int


PROFILES = {
    # 3 layers: in the cross-layer layout a token's row (3 layers) then does not divide a page,
    # so a slot is no whole number of rows and `fa2_varlen` takes its per-request path there.
    "cuda": Profile(3, (2, 5, 9, 17, 30, 48, 70, 101, 140, 190, 247, 300), (3, 28), 64, 384),
    # Smaller on the CPU, where the Triton interpreter and unfused flex cost seconds a step.
    "cpu": Profile(2, (2, 3, 5, 8, 12, 17, 24, 33, 45, 64, 90, 128), (2, 10), 32, 160),
}


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str
    kv_cache: str
    layout: str  # "-" for the paged cache (one layout)
    mode: str

    def __str__(self) -> str:
        return f"{self.backend}-{self.kv_cache}-{self.layout}-{self.mode}"


def all_cases() -> list[Case]:
    """Every registered backend over the cache it takes, in every layout and graph mode."""
    out = []
    for name in backend_names():
        paged = get_backend_class(name).paged
        for layout in ("-",) if paged else LAYOUTS:
            for mode in MODES:
                out.append(Case(name, "paged" if paged else "vattention", layout, mode))
    return out


CASES = [pytest.param(c, id=str(c)) for c in all_cases()]


def workload(profile: Profile, seed: int = 7) -> tuple[list[list[int]], list[SamplingParams]]:
    """The profile's prompt lengths in a seeded order, seeded `max_tokens` each."""
    gen = torch.Generator().manual_seed(seed)
    lengths = profile.prompt_lens
    order = torch.randperm(len(lengths), generator=gen).tolist()
    prompts = [torch.randint(1, 128, (lengths[i],), generator=gen).tolist() for i in order]
    new = torch.randint(*profile.max_tokens, (len(prompts),), generator=gen).tolist()
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2) for n in new]
    return prompts, params


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """device -> the directory of its tiny random Llama (HF format), saved on first use."""
    root = tmp_path_factory.mktemp("matrix")

    @functools.cache
    def save(device: str) -> Path:
        save_tiny("llama", root / device, seed=3, num_hidden_layers=PROFILES[device].layers,
                  max_position_embeddings=512)  # fmt: skip
        return root / device

    return save


class Rejected(Exception):
    """The backend's constructor refused the engine's cache (a limit it declares)."""


def _emulate_graphs(llm: LLM) -> None:
    """Give a CPU engine the step graphs `LLMEngine` builds on CUDA, emulated (see
    `test_cuda_graphs.py`); its last slot becomes the padding slot (on CUDA: an extra one)."""
    eng = llm.engine
    cfg = eng.config
    seqs = cfg.max_num_seqs - 1
    tokens = eng.scheduler.config.max_num_batched_tokens
    eng.scheduler.config = SchedulerConfig(seqs, tokens, eng.max_model_len)
    dummy = eng.cache.alloc_slot()
    eng.cache.ensure(dummy, 1)
    eng.runner = ModelRunner(
        eng.model, eng.cache, eng.attn, Sampler(seed=cfg.seed), eng.device, eng.max_model_len,
        default_graph_sizes(seqs), dummy,
        mixed_sizes=mixed_token_sizes(tokens, seqs, cfg.mixed_graph_tokens), max_num_seqs=seqs,
        max_graph_prefills=cfg.max_graph_prefills, emulate_graphs=True,
    )  # fmt: skip


def _skip_duplicate(case: Case, decode_ok: bool, mixed_ok: bool) -> None:
    """Skip a graph mode whose steps another case of the backend already runs the same way."""
    if case.mode == "mixed_graphs" and not mixed_ok:
        same = "decode_graphs" if decode_ok else "eager"
        pytest.skip(f"{case.backend} captures no mixed step: runs as {same}")
    if case.mode == "decode_graphs" and not decode_ok:
        pytest.skip(f"{case.backend} captures no decode step: runs as eager")
    if case.mode == "decode_graphs" and mixed_ok:
        pytest.skip(f"{case.backend}: eager and mixed_graphs run its eager and captured steps")


def run_case(
    model_dir: Path, case: Case, device: str, dtype: str, skip_duplicates: bool = False
) -> list[RequestOutput]:
    """The workload through `case` (skipped where the backend refuses the combination)."""
    if get_backend_class(case.backend).decode_only:
        pytest.skip(f"{case.backend} declares decode_only: the engine refuses it")
    emulated = device == "cpu" and case.mode != "eager"
    profile = PROFILES[device]
    opts: dict[str, Any] = dict(
        kv_cache=case.kv_cache, attention_backend=case.backend, dtype=dtype, device=device,
        max_model_len=profile.max_len, max_num_seqs=MAX_SEQS + emulated,
        max_num_batched_tokens=profile.batched,
        block_size=16, async_scheduling=True, enforce_eager=case.mode == "eager",
        mixed_graph_tokens=0 if case.mode == "decode_graphs" else 2048,
    )  # fmt: skip
    if case.layout != "-":
        opts["kv_layout"] = case.layout
    if device == "cpu":
        opts["kv_page_size"] = 64 * 1024
    else:
        opts["kv_cache_memory"] = 256 << 20
    create = llm_engine.create_backend

    def create_or_reject(*args: Any, **kwargs: Any) -> Any:
        try:
            return create(*args, **kwargs)
        except ValueError as err:
            raise Rejected(str(err)) from err

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llm_engine, "create_backend", create_or_reject)
        try:
            llm = LLM(str(model_dir), **opts)
        except Rejected as err:
            pytest.skip(f"{case.backend} refuses this cache: {err}")
    prompts, params = workload(profile)
    with llm:
        eng = llm.engine
        decode_ok = eng.attn.supports_decode_graphs
        mixed_ok = getattr(eng.attn, "mixed_graph_block_m", None) is not None
        if emulated:
            if skip_duplicates:
                _skip_duplicate(case, decode_ok, mixed_ok)
            _emulate_graphs(llm)
        outs = llm.generate(prompts, params, use_tqdm=False)
        steps = dict(eng.runner.graph_steps)
        assert not eng.has_unfinished_requests()
        eng.cache.check_integrity()
    graphs = case.mode != "eager"
    assert (steps["decode"] > 0) == (graphs and decode_ok), steps
    assert (steps["mixed"] > 0) == (case.mode == "mixed_graphs" and mixed_ok), steps
    return outs


@functools.cache
def reference(model_dir: Path, device: str, dtype: str) -> list[RequestOutput]:
    return run_case(model_dir, Case(REFERENCE, "vattention", "cross_layer", "eager"), device, dtype)


def check_outputs(ref: list[RequestOutput], got: list[RequestOutput], dtype: str) -> None:
    """`got` equals `ref`, but for requests that part from it at a near-tie of `ref`."""
    tol, share = TOLERANCE[dtype]
    whole = 0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        want, have = r.token_ids, g.token_ids
        assert len(have) == len(want), f"request {i}: {len(have)} tokens, not {len(want)}"
        at = next((j for j, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), None)
        if at is None:
            whole += 1
            continue
        lp = r.outputs[0].logprobs
        assert lp is not None
        top = lp[at].top
        gap = top[0][1] - top[1][1]
        assert have[at] in (top[0][0], top[1][0]) and gap <= tol, (
            f"request {i} ({len(r.prompt_token_ids)} prompt tokens) parts from the reference at "
            f"token {at}: {have[at]} for {want[at]}, where the reference's top two are {top}"
        )
    assert whole >= share * len(ref), f"only {whole} of {len(ref)} requests match whole"


@pytest.mark.parametrize("case", CASES)
def test_backend_matrix_cpu(model_dir: Callable[[str], Path], case: Case) -> None:
    got = run_case(model_dir("cpu"), case, "cpu", "float32", skip_duplicates=True)
    check_outputs(reference(model_dir("cpu"), "cpu", "float32"), got, "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_backend_matrix_gpu(model_dir: Callable[[str], Path], case: Case) -> None:
    try:
        got = run_case(model_dir("cuda"), case, "cuda", "bfloat16")
        check_outputs(reference(model_dir("cuda"), "cuda", "bfloat16"), got, "bfloat16")
    finally:
        gc.collect()
        torch.cuda.synchronize()


def test_matrix_covers_every_backend_and_cache() -> None:
    """The enumeration: every registered backend, over the one cache kind it takes."""
    cases = all_cases()
    assert {c.backend for c in cases} == set(backend_names())
    for name in backend_names():
        mine = [c for c in cases if c.backend == name]
        kinds = {c.kv_cache for c in mine}
        assert kinds == {"paged" if get_backend_class(name).paged else "vattention"}
        assert len(mine) == len(MODES) * (1 if get_backend_class(name).paged else len(LAYOUTS))
    assert REFERENCE in backend_names() and not get_backend_class(REFERENCE).paged


@pytest.mark.gpu
def test_engine_create_close_cycles_give_back_cuda_memory(
    model_dir: Callable[[str], Path],
) -> None:
    """50 engines (vAttention cache, CUDA graphs) created, used and closed: torch's allocated
    bytes come back exactly after each, and the device's free memory does not drift (the
    cache's pages live outside torch's allocator)."""
    opts: dict[str, Any] = dict(
        kv_cache="vattention", dtype="bfloat16", device="cuda", max_model_len=128,
        max_num_seqs=2, max_num_batched_tokens=64, mixed_graph_tokens=32,
        kv_cache_memory=64 << 20,
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def cycle() -> None:
        with LLM(str(model_dir("cuda")), **opts) as llm:
            outs = llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], params, use_tqdm=False)
            assert [len(o.token_ids) for o in outs] == [4, 4]
        gc.collect()
        torch.cuda.synchronize()

    cycle()  # the first run loads kernels and fills torch's caches
    allocated = torch.cuda.memory_allocated()
    free = torch.cuda.mem_get_info()[0]
    for i in range(49):
        cycle()
        assert torch.cuda.memory_allocated() == allocated, f"cycle {i + 2}"
        drift = free - torch.cuda.mem_get_info()[0]
        assert drift <= 64 << 20, f"cycle {i + 2}: {drift >> 20} MiB less free memory"
