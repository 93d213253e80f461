"""GPU: prefix caching on CUDA gives the same greedy tokens as no caching, in every graph mode.

A random Llama in float32 (HF format, real loader) with 32 KiB of K and V per token in the
default `cross_layer_kv` layout, so a 2 MiB page holds 64 tokens; prompts share a 400-token
system prompt (six whole pages), some repeat, and a second pass finds every full page cached.
The vAttention cache maps the cached pages into new slots (same physical pages), or a prefix
segment (a device copy of a hot prefix in one allocation, mapped whole); the paged cache lists
the cached blocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_helpers import save_tiny

from vattention import LLM, SamplingParams

pytestmark = pytest.mark.gpu
WIDE = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
            num_hidden_layers=8, intermediate_size=768, max_position_embeddings=1024)  # fmt: skip
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    system = torch.randint(3, 120, (400,), generator=gen).tolist()
    out = [system + torch.randint(3, 120, (n,), generator=gen).tolist() for n in (5, 90, 200)]
    return out + [list(out[0]), system[:130] + [5, 6, 7]]


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
@pytest.mark.parametrize(
    "mode",
    [{}, {"enforce_eager": True}, {"mixed_graph_tokens": 0}],
    ids=["graphs", "eager", "decode_graphs"],
)
def test_prefix_caching_on_cuda_keeps_the_tokens(
    tmp_path: Path, kv_cache: str, mode: dict[str, object]
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    save_tiny("llama", tmp_path / "m", **WIDE)
    batch = _prompts()

    def run(share: bool) -> tuple[list[list[int]], int]:
        with LLM(str(tmp_path / "m"), kv_cache=kv_cache, dtype="float32", device="cuda",
                 max_model_len=1024, max_num_seqs=2, max_num_batched_tokens=256,
                 kv_cache_memory=512 << 20, block_size=16, enable_prefix_caching=share,
                 **mode) as llm:  # type: ignore[arg-type]  # fmt: skip
            outs = [o.token_ids for o in llm.generate(batch, PARAMS, use_tqdm=False)]
            again = [o.token_ids for o in llm.generate(batch, PARAMS, use_tqdm=False)]
            assert again == outs
            prefix = llm.engine.scheduler.prefix
            llm.engine.cache.check_integrity()
            return outs, 0 if prefix is None else prefix.hit_tokens

    want, _ = run(False)
    got, hits = run(True)
    assert got == want
    # the second pass alone finds every prompt's full pages (64 tokens; paged blocks are finer)
    assert hits >= sum((len(p) - 1) // 64 * 64 for p in batch)


def test_prefix_segments_on_cuda_keep_the_tokens(tmp_path: Path) -> None:
    """Six requests behind the system prompt, four at a time, segments from one page on: the
    third admission copies the hot prompt into one allocation per buffer on the device and
    later ones map it whole; tokens equal those without sharing, with CUDA graphs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    save_tiny("llama", tmp_path / "m", **WIDE)
    batch = _prompts()[:3] * 2

    def run(share: bool) -> tuple[list[list[int]], int]:
        with LLM(str(tmp_path / "m"), dtype="float32", device="cuda", max_model_len=1024,
                 max_num_seqs=4, max_num_batched_tokens=512, kv_cache_memory=512 << 20,
                 enable_prefix_caching=share, kv_segment_min_pages=1) as llm:  # fmt: skip
            llm.generate(batch[:1], PARAMS, use_tqdm=False)  # publishes the system prompt
            outs = [o.token_ids for o in llm.generate(batch, PARAMS, use_tqdm=False)]
            llm.engine.cache.check_integrity()
            return outs, llm.engine.cache.stats().segment_bytes

    want, _ = run(False)
    got, segment_bytes = run(True)
    assert segment_bytes > 0
    assert got == want
