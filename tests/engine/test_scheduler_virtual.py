"""The scheduler on the real `VirtualKVCache` (CPU backend) under a tight page budget."""

from __future__ import annotations

from tests.engine.helpers import FakeModel, drive
from tests.kvcache.helpers import CPU_PAGE, make_spec
from vattention import VirtualKVCache
from vattention.engine.request import FinishReason, Request
from vattention.engine.sampling_params import SamplingParams
from vattention.engine.scheduler import Scheduler
from vattention.engine.scheduling import SchedulerConfig


def test_preemption_and_kv_memory_on_a_virtual_cache() -> None:
    spec = make_spec("cpu")
    with VirtualKVCache(spec, "cpu", budget_bytes=6 * CPU_PAGE) as cache:
        per_page = int(cache.layout.tokens_per_page)  # 6 pages = 3 page-steps of K and V
        config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=700)
        sched = Scheduler(config, cache)
        lens = [per_page, per_page // 2, per_page + 5, 4 * per_page]
        reqs = [
            Request(f"r{i}", [i % 50] * n, SamplingParams(max_tokens=12))
            for i, n in enumerate(lens)
        ]
        for r in reqs:
            sched.add_request(r)
        done = drive(sched, FakeModel())
        assert sorted(r.request_id for r in done) == ["r0", "r1", "r2", "r3"]
        assert [r.finish_reason for r in reqs] == [FinishReason.LENGTH] * 3 + [
            FinishReason.KV_MEMORY
        ]
        assert all(r.num_output_tokens == 12 for r in reqs[:3])
        assert sched.num_preemptions > 0
        assert cache.num_free_slots == spec.max_slots
        cache.check_integrity()
