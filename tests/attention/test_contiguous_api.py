"""The contiguous backends' interface: registry, input checks, multi-step use over one cache."""

from __future__ import annotations

import pytest
import torch
from reference import DenseKVCache, random_requests, reference_attention

from vattention.attention import (
    DEFAULT_BACKEND,
    AttentionMetadata,
    backend_names,
    create_backend,
)
from vattention.attention.contiguous import uniform_batch
from vattention.attention.triton_decode import triton_usable

CPU_BACKENDS = ["torch_sdpa_ref", "sdpa", "flex", "auto"]


def small_cache(layout: str = "per_layer", layers: int = 2) -> DenseKVCache:
    return DenseKVCache(layers, 4, 48, 2, 16, torch.float32, "cpu", layout)


def test_registry_has_every_contiguous_backend() -> None:
    names = set(backend_names())
    assert {"torch_sdpa_ref", "sdpa", "flex", "fa2_varlen", "triton_decode", "auto"} <= names
    assert DEFAULT_BACKEND == "auto"
    with pytest.raises(ValueError, match="unknown attention backend"):
        create_backend("nope", small_cache(), 4, 2, 16)


def test_fa2_refuses_a_cpu_cache() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        create_backend("fa2_varlen", small_cache(), 4, 2, 16)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in (triton_usable(torch.device("cpu")) or "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_usable(torch.device("cpu")) is None


@pytest.mark.parametrize("name", [*CPU_BACKENDS, "triton_decode"])
def test_bad_inputs_get_clear_errors(name: str) -> None:
    cache = small_cache()
    with pytest.raises(ValueError, match="kv heads"):
        create_backend(name, cache, 6, 3, 16)
    backend = create_backend(name, cache, 4, 2, 16)
    meta = AttentionMetadata.build([0, 1], [3, 0], [1, 1])
    k = torch.zeros(2, 2, 16)
    with pytest.raises(ValueError, match="q must be"):
        backend.attend(0, torch.zeros(3, 4, 16), meta)
    with pytest.raises(TypeError, match="dtype"):
        backend.attend(0, torch.zeros(2, 4, 16, dtype=torch.float64), meta)
    with pytest.raises(ValueError, match="k and v must be"):
        backend.write_kv(0, k, torch.zeros(2, 2, 8), meta)
    too_long = AttentionMetadata.build([0], [48], [1])
    with pytest.raises(ValueError, match="max_seq_len"):
        backend.attend(0, torch.zeros(1, 4, 16), too_long)


def test_triton_decode_refuses_prefill() -> None:
    backend = create_backend("triton_decode", small_cache(), 4, 2, 16)
    meta = AttentionMetadata.build([0], [0], [3])
    with pytest.raises(ValueError, match="decode batches only"):
        backend.attend(0, torch.zeros(3, 4, 16), meta)
    with pytest.raises(ValueError, match="num_splits"):
        create_backend("triton_decode", small_cache(), 4, 2, 16, num_splits=0)
    with pytest.raises(ValueError, match="exclusive with num_splits"):
        create_backend("triton_decode", small_cache(), 4, 2, 16, num_splits=2, partition_size=64)
    with pytest.raises(ValueError, match="power-of-two"):
        create_backend("triton_decode", DenseKVCache(1, 2, 8, 1, 24), 1, 1, 24)


def test_auto_options_are_checked() -> None:
    with pytest.raises(ValueError, match="decode must be"):
        create_backend("auto", small_cache(), 4, 2, 16, decode="magic")
    with pytest.raises(ValueError, match="prefill must be"):
        create_backend("auto", small_cache(), 4, 2, 16, prefill="magic")


def test_auto_sends_only_long_work_to_cudnn() -> None:
    """cuDNN builds a graph per new shape, so `auto` gives it only requests with enough new
    tokens *and* enough work (new x context tokens): long chunks over long contexts, not
    fresh prompts of mid length (`sdpa.CUDNN_MIN_WORK`)."""
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="cudnn_min_work"):
        create_backend("auto", small_cache(), 4, 2, 16, cudnn_min_work=-1)
    auto = create_backend(
        "auto", small_cache(), 4, 2, 16, cudnn_min_tokens=4, cudnn_min_work=64, split_chunks=True
    )
    # (new tokens, context incl. new): a decode, a short chunk, a fresh prompt under the work
    # bound, one above it, a chunk over a long context, one with too few new tokens
    meta = SimpleNamespace(query_lens_host=[1, 2, 6, 8, 5, 3], seq_lens_host=[30, 40, 6, 8, 20, 90])
    fresh, chunks, rest = auto._cudnn_split(meta)  # type: ignore[attr-defined]
    assert (fresh, chunks, rest) == ([3], [4], [1, 2, 5])
    auto.cudnn_min_work = 0  # new tokens alone decide
    assert auto._cudnn_split(meta)[:2] == ([2, 3], [4])  # type: ignore[attr-defined]


def test_uniform_batch_detection() -> None:
    assert uniform_batch(AttentionMetadata.build([2, 3], [5, 5], [1, 1])) is not None
    assert uniform_batch(AttentionMetadata.build([3, 2], [5, 5], [1, 1])) is None
    assert uniform_batch(AttentionMetadata.build([2, 4], [5, 5], [1, 1])) is None
    assert uniform_batch(AttentionMetadata.build([2, 3], [5, 6], [1, 1])) is None
    u = uniform_batch(AttentionMetadata.build([1, 2], [4, 4], [3, 3]))
    assert u is not None and (u.first_slot, u.num_seqs, u.context_len, u.seq_len) == (1, 2, 4, 7)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["per_layer", "cross_layer", "cross_layer_kv"])
def test_chunked_prefill_then_decode_over_steps(name: str, layout: str) -> None:
    """Two requests: prompt chunks then decode steps; the backend writes every token itself.

    Every step runs two layers with different data through one metadata object, so per-step
    plans cached by the backend must be right for every layer.
    """
    cache = small_cache(layout)
    backend = create_backend(name, cache, 8, 2, 16)
    gen = torch.Generator().manual_seed(7)
    slots, totals = [3, 1], [30, 21]
    full = [random_requests(totals, 2, 16, generator=gen) for _ in range(2)]  # per layer
    schedule = [([0, 0], [13, 9]), ([13, 9], [12, 10]), ([25, 19], [1, 1]), ([26, 20], [1, 1])]
    for context_lens, query_lens in schedule:
        meta = AttentionMetadata.build(slots, context_lens, query_lens)
        seq_lens = [c + n for c, n in zip(context_lens, query_lens, strict=True)]
        for layer in (0, 1):
            keys, values = full[layer]
            k_new = torch.cat(
                [k[c:s] for k, c, s in zip(keys, context_lens, seq_lens, strict=True)]
            )
            v_new = torch.cat(
                [v[c:s] for v, c, s in zip(values, context_lens, seq_lens, strict=True)]
            )
            q = torch.randn(sum(query_lens), 8, 16, generator=gen)
            out = backend.forward(layer, q, k_new, v_new, meta)
            expected = reference_attention(
                q,
                [k[:s] for k, s in zip(keys, seq_lens, strict=True)],
                [v[:s] for v, s in zip(values, seq_lens, strict=True)],
                query_lens,
                16**-0.5,
            )
            torch.testing.assert_close(out.double(), expected, atol=2e-4, rtol=0)


def test_custom_scale_is_used() -> None:
    cache = small_cache()
    gen = torch.Generator().manual_seed(3)
    keys, values = random_requests([5], 2, 16, generator=gen)
    q = torch.randn(5, 4, 16, generator=gen)
    meta = AttentionMetadata.build([0], [0], [5])
    for name in CPU_BACKENDS:
        out = create_backend(name, cache, 4, 2, 16, scale=0.5).forward(
            0, q, keys[0], values[0], meta
        )
        expected = reference_attention(q, keys, values, [5], 0.5)
        torch.testing.assert_close(out.double(), expected, atol=2e-4, rtol=0)


def test_default_cudnn_rule_takes_long_prompt_chunks_not_mid_prompts() -> None:
    """The defaults: every 8K chunk of a long prompt (the first, fresh, and those over a
    context) goes to cuDNN, fresh prompts under 8K tokens and short chunks do not."""
    from vattention.attention.sdpa import CUDNN_MIN_TOKENS, CUDNN_MIN_WORK, takes_cudnn

    def rule(new: int, seq: int) -> bool:
        return takes_cudnn(new, seq, CUDNN_MIN_TOKENS, CUDNN_MIN_WORK)

    assert all(rule(8192, 8192 * c) for c in (1, 2, 3, 4, 8))  # chunks of a 64K prompt
    assert rule(6000, 14000)  # a remainder chunk over a long context
    assert not rule(7000, 7000) and not rule(4096, 4096)  # fresh mid-length prompts
    assert not rule(2048, 60000)  # too few new tokens: the Triton kernel
    assert not takes_cudnn(8192, 8192, 0, CUDNN_MIN_WORK)  # cudnn_min_tokens=0: never
