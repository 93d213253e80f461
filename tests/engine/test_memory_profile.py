"""The start-up memory profile (`engine/memory_profile.py`) on the CPU.

The budget arithmetic and its error; the profile steps' shapes; the profile steps themselves
through the real code path (scheduler, runner, model, sampler) on the tiny preset over a
temporary cache of each kind, leaving no slot, page or block held; `profile_memory` end to end
with given device figures (the steps measure 0 on the CPU), closing its temporary cache.
`test_memory_profile_gpu.py` runs the real thing on CUDA.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from vattention import LLM
from vattention.engine import memory_profile as mp
from vattention.engine.scheduling import SchedulerConfig
from vattention.models.loader import load_model

GiB = 1 << 30
# (kind, attention backend the engine picks on the CPU, page size). Pages of 8 tokens (4 KiB):
# a slot step (a) filled must give pages back for step (b)'s many short prompts.
KINDS = [("vattention", "auto", os.sysconf("SC_PAGE_SIZE")), ("paged", "paged_torch", None)]


def test_budget_is_the_share_of_total_minus_what_is_measured() -> None:
    prof = mp.kv_budget(100 * GiB, 20 * GiB, 3 * GiB, GiB, 0.9, margin=256 << 20)
    assert prof.kv_budget == int(90 * GiB) - 24 * GiB - (256 << 20)
    assert (prof.total, prof.in_use, prof.step_peak, prof.graph_reserve) == (
        100 * GiB, 20 * GiB, 3 * GiB, GiB,
    )  # fmt: skip
    assert prof.as_dict()["kv_budget"] == prof.kv_budget
    assert "KV budget" in prof.describe()


def test_no_room_left_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no memory left for the KV cache") as err:
        mp.kv_budget(80 * GiB, 70 * GiB, 2 * GiB, GiB, 0.9)
    text = str(err.value)
    for word in ("80.00 GiB total", "70.00 in use", "2.00 step peak", "gpu_memory_utilization"):
        assert word in text


def test_profile_steps_are_the_largest_the_scheduler_makes() -> None:
    steps = mp.profile_steps(SchedulerConfig(64, 16384, 8192))
    assert steps[0] == [8191, 8191, 2]  # (a) the budget as fresh prefill
    assert steps[1] == [256] * 64  # (b) every sequence samples
    assert mp.profile_steps(SchedulerConfig(1, 16384, 8192)) == [[8191]]  # one sequence only
    assert mp.shared_lengths(10, 4, 100) == [3, 3, 2, 2]
    assert mp.shared_lengths(3, 8, 100) == [1, 1, 1]
    assert mp.prefill_lengths(10, 8, 4) == [4, 4, 2]


def test_graph_outputs_count_every_kept_logits_tensor() -> None:
    got = mp.graph_outputs_bytes([1, 2, 4, 8], [16, 128], max_num_seqs=8, vocab=100)
    assert got == (1 + 2 + 4 + 8 + 8 + 8) * 100 * 4


def test_a_step_peak_is_the_larger_growth_of_allocated_or_reserved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stats = {"allocated": 10, "reserved": 20, "max_allocated": 10, "max_reserved": 20}
    ran: list[str] = []

    def step() -> None:  # takes 40 bytes, which the allocator rounds up to 60
        ran.append("step")
        stats.update(max_allocated=50, max_reserved=80)

    cuda = torch.cuda
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(cuda, name, lambda *a, n=name: ran.append(n))
    monkeypatch.setattr(cuda, "memory_allocated", lambda *a: stats["allocated"])
    monkeypatch.setattr(cuda, "memory_reserved", lambda *a: stats["reserved"])
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: stats["max_allocated"])
    monkeypatch.setattr(cuda, "max_memory_reserved", lambda *a: stats["max_reserved"])
    assert mp._measure(torch.device("cuda", 0), step) == 60
    assert ran == ["synchronize", "empty_cache", "reset_peak_memory_stats", "step", "synchronize"]
    assert mp._measure(torch.device("cpu"), step) == 0


def _tiny(kind: str, page_size: int | None) -> tuple[Any, Any, SchedulerConfig]:
    model = load_model("tiny", torch.float32, "cpu", load_format="dummy")
    spec = model.config.kv_cache_spec(9, 128, torch.float32, page_size=page_size)
    return model, spec, SchedulerConfig(8, 300, 128)


@pytest.mark.parametrize(("kind", "backend", "page_size"), KINDS)
def test_profile_steps_run_and_leave_nothing_held(
    kind: str, backend: str, page_size: int | None
) -> None:
    model, spec, sched = _tiny(kind, page_size)
    steps = mp.profile_steps(sched) + [mp.shared_lengths(64, 8, 127)]
    assert steps[:2] == [[127, 127, 46], [38] * 4 + [37] * 4]
    cache = mp.profile_cache(kind, spec, torch.device("cpu"), 16, steps)
    try:
        assert cache.spec.max_slots == 8
        if kind == "paged":  # just enough blocks for the largest step: (b), 8 x 3
            assert cache.num_blocks - 1 == 24
        cpu = torch.device("cpu")
        peaks = mp.run_profile_steps(model, cache, backend, sched, steps, cpu)
        assert peaks == [0, 0, 0]  # nothing to measure on the CPU
        assert mp.run_profile_steps(model, cache, backend, sched, steps[::-1], cpu) == peaks
        cache.check_integrity()
        assert cache.num_free_slots == cache.spec.max_slots
        if kind == "paged":
            assert cache.num_free_blocks == cache.num_blocks - 1
        else:
            assert cache.stats().slots_used == 0
    finally:
        cache.close()


@pytest.mark.parametrize(
    ("kind", "backend", "page_size"), [*KINDS, ("paged", "pa_triton", None)]
)  # pa_triton (Triton interpreter): a backend that captures both kinds of graph
def test_profile_memory_sizes_the_budget_and_closes_its_cache(
    kind: str, backend: str, page_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, spec, sched = _tiny(kind, page_size)
    made: list[Any] = []
    real = mp.profile_cache

    def recording(*args: Any) -> Any:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(mp, "profile_cache", recording)
    prof = mp.profile_memory(
        model, kind=kind, spec=spec, device=torch.device("cpu"), attention_backend=backend,
        block_size=16, scheduler_config=sched, utilization=0.5, decode_graph_sizes=[1, 2, 4, 8],
        mixed_graph_sizes=[16, 32], mem_info=lambda d: (60 * GiB, 64 * GiB),
    )  # fmt: skip
    assert len(made) == 1 and made[0].closed
    # Only the graphs the runner would capture with this backend get their logits reserved
    # (auto's CPU decode kernel and paged_torch read host lists: no graphs of either kind).
    decode_ok, mixed_ok = {"auto": (False, False), "paged_torch": (False, False),
                           "pa_triton": (True, True)}[backend]  # fmt: skip
    kept = mp.graph_outputs_bytes(
        [1, 2, 4, 8] if decode_ok else [], [16, 32] if mixed_ok else [], 8,
        model.config.vocab_size,
    )  # fmt: skip
    assert (decode_ok or mixed_ok) == (kept > 0)
    assert (prof.step_peak, prof.graph_reserve, prof.in_use) == (0, kept, 4 * GiB)
    assert prof.kv_budget == 32 * GiB - 4 * GiB - kept - mp.MARGIN
    with pytest.raises(ValueError, match="no memory left"):
        mp.profile_memory(
            model, kind=kind, spec=spec, device=torch.device("cpu"), attention_backend=backend,
            block_size=16, scheduler_config=sched, utilization=0.5,
            mem_info=lambda d: (1 * GiB, 64 * GiB),
        )  # fmt: skip
    assert made[-1].closed


@pytest.mark.parametrize("kv_cache_memory", [None, 48 * 1024])
def test_engine_profiles_only_on_cuda_without_kv_cache_memory(kv_cache_memory: int | None) -> None:
    with LLM(
        "tiny", load_format="dummy", device="cpu", max_model_len=64, max_num_seqs=2,
        kv_cache="paged", kv_cache_memory=kv_cache_memory,
    ) as llm:  # fmt: skip
        assert llm.engine.memory_profile is None
        blocks = (kv_cache_memory or 2 << 30) // llm.engine.cache.block_bytes
        assert llm.engine.cache.num_blocks == min(blocks, 2 * 4) + 1  # capped at 2 full slots
