"""Sampler: exact greedy, filter supports, the exponential race's distribution, per-request seeds
independent of the batch, log-probabilities, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from vattention.engine.sampler import Sampler, SamplingMetadata
from vattention.engine.sampling_params import SamplingParams as SP

# Probabilities 0.5, 0.3, 0.15, 0.05 (token order shuffled so sorting is exercised).
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log()
BY_RANK = [1, 3, 0, 2]  # token ids from most to least likely


def meta(params: list[SP], gens: list | None = None, device: str = "cpu") -> SamplingMetadata:
    return SamplingMetadata.build(params, gens, device)


def support(params: SP, logits: torch.Tensor = LOGITS) -> set[int]:
    probs = Sampler().probs(logits.unsqueeze(0), meta([params]))[0]
    return set(torch.nonzero(probs).flatten().tolist())


def test_greedy_rows_are_exact_argmax_in_a_mixed_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    params = [SP(temperature=0), SP(temperature=1.0), SP(temperature=0, top_k=3), SP(top_p=0.5)]
    params += [SP(temperature=0, seed=3), SP(min_p=0.2)]
    out = Sampler()(logits, meta(params))
    argmax = logits.argmax(-1)
    for i in (0, 2, 4):
        assert out.token_ids[i] == argmax[i]
    all_greedy = Sampler()(logits, meta([SP(temperature=0)] * 6))
    assert torch.equal(all_greedy.token_ids, argmax)
    assert out.logprobs is None and out.token_ids.dtype == torch.int64


def test_top_k_one_is_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 500)
    for extra in ({}, {"top_p": 0.9}, {"min_p": 0.01}):
        out = Sampler()(logits, meta([SP(top_k=1, temperature=2.0, **extra)] * 64))
        assert torch.equal(out.token_ids, logits.argmax(-1))


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SP(), 4),
        (SP(top_k=2), 2),
        (SP(top_k=10), 4),
        (SP(top_p=0.4), 1),
        (SP(top_p=0.7), 2),
        (SP(top_p=0.85), 3),
        (SP(min_p=0.25), 3),  # keeps p >= 0.125
        (SP(min_p=0.5), 2),  # keeps p >= 0.25
        (SP(top_k=3, top_p=0.99), 3),
        (SP(top_k=3, min_p=0.5), 2),
        (SP(top_p=0.85, min_p=0.5), 2),
    ],
)
def test_filters_keep_the_most_likely_tokens(params: SP, kept: int) -> None:
    assert support(params) == set(BY_RANK[:kept])


def test_temperature_does_not_change_top_p_support_order_but_changes_mass() -> None:
    # A hotter distribution needs more tokens to reach the same top_p.
    assert support(SP(top_p=0.7, temperature=1.0)) == set(BY_RANK[:2])
    assert support(SP(top_p=0.7, temperature=5.0)) == set(BY_RANK[:3])


def test_filtered_probabilities_renormalise_and_rows_do_not_interact() -> None:
    params = [SP(top_k=2), SP(top_p=0.85), SP(min_p=0.5), SP(), SP(temperature=0)]
    batch = Sampler().probs(LOGITS.expand(5, 4), meta(params))
    for i, p in enumerate(params[:4]):
        alone = Sampler().probs(LOGITS.unsqueeze(0), meta([p]))[0]
        torch.testing.assert_close(batch[i], alone)
        assert math.isclose(batch[i].sum().item(), 1.0, rel_tol=1e-5)
    torch.testing.assert_close(batch[1][[1, 3, 0]], torch.tensor([0.5, 0.3, 0.15]) / 0.95)


def test_sampling_follows_the_filtered_distribution() -> None:
    n = 40_000
    sampler = Sampler(seed=1234)
    for params, expected in (
        (SP(), PROBS),
        (SP(top_k=2), torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8),
        (SP(temperature=0.5), PROBS**2 / (PROBS**2).sum()),
    ):
        tokens = sampler(LOGITS.expand(n, 4).contiguous(), meta([params] * n)).token_ids
        freq = torch.bincount(tokens, minlength=4).float() / n
        torch.testing.assert_close(freq, expected, atol=0.012, rtol=0)


def draw_sequence(seed: int, row: int, batch: int, steps: int = 5) -> list[int]:
    """Tokens a seeded request draws in row `row` of a batch of random neighbours."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(100 + batch)  # neighbours and their noise differ per batch size
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(steps):
        params = [SP(temperature=0.9, top_k=-1 if i % 2 else 20, seed=None) for i in range(batch)]
        params[row] = SP(temperature=0.8, top_p=0.95, seed=seed)
        gens: list = [None] * batch
        gens[row] = gen
        if batch > 2:  # another seeded neighbour
            other = (row + 1) % batch
            params[other] = SP(seed=99)
            gens[other] = torch.Generator().manual_seed(99)
        rows = torch.randn(batch, 50)
        rows[row] = logits
        tokens.append(int(Sampler()(rows, meta(params, gens)).token_ids[row]))
    return tokens


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    alone = draw_sequence(seed=7, row=0, batch=1)
    assert draw_sequence(seed=7, row=3, batch=6) == alone
    assert draw_sequence(seed=7, row=10, batch=17) == alone
    others = {tuple(draw_sequence(seed=s, row=0, batch=1)) for s in range(8, 14)}
    assert len(others | {tuple(alone)}) > 1


def test_sampler_seed_makes_unseeded_rows_reproducible() -> None:
    logits = torch.randn(8, 100)
    m = meta([SP()] * 8)
    a = Sampler(seed=5)(logits, m).token_ids
    b = Sampler(seed=5)(logits, m).token_ids
    assert torch.equal(a, b)


def test_logprobs_are_the_models_top_k() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    params = [SP(temperature=0, logprobs=4), SP(logprobs=0, temperature=2.0), SP()]
    out = Sampler()(logits, meta(params))
    assert out.logprobs is not None
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs.top_ids.shape == (3, 4) and out.logprobs.top_values.shape == (3, 4)
    torch.testing.assert_close(out.logprobs.top_values, ref.topk(4, -1).values)
    assert torch.equal(out.logprobs.top_ids, ref.topk(4, -1).indices)
    torch.testing.assert_close(
        out.logprobs.sampled, ref.gather(1, out.token_ids.unsqueeze(1)).squeeze(1)
    )
    only_sampled = Sampler()(logits, meta([SP(logprobs=0)] * 3)).logprobs
    assert only_sampled is not None and only_sampled.top_ids.shape == (3, 0)
    host = out.logprobs.to_host()
    entry = host.entry(0, int(out.token_ids[0]), 2)
    assert entry.token_id == int(logits[0].argmax()) and len(entry.top) == 2
    assert entry.top[0][0] == entry.token_id and math.isclose(entry.top[0][1], entry.logprob)


def test_bad_input_is_rejected() -> None:
    m = meta([SP(), SP()])
    with pytest.raises(ValueError, match="2-D"):
        Sampler()(torch.randn(2, 3, 4), m)
    with pytest.raises(ValueError, match="3 rows, metadata 2"):
        Sampler()(torch.randn(3, 10), m)
    with pytest.raises(TypeError, match="floating point"):
        Sampler()(torch.ones(2, 10, dtype=torch.int64), m)
    with pytest.raises(ValueError, match="metadata is on meta"):
        Sampler()(torch.randn(2, 10), meta([SP(), SP()], device="meta"))
    with pytest.raises(ValueError, match="1 generators for 2 rows"):
        meta([SP(), SP()], [None])
    with pytest.raises(TypeError, match="SamplingParams"):
        meta([{"temperature": 0}])  # type: ignore[list-item]


@pytest.mark.gpu
def test_cuda_batch_256_greedy_exact_and_seeded_reproducible() -> None:
    torch.manual_seed(0)
    logits = torch.randn(256, 128_256, device="cuda")
    params = [
        SP(temperature=0) if i % 4 == 0 else SP(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05)
        for i in range(256)
    ]
    params[1] = SP(temperature=0.7, top_p=0.9, seed=11)
    gens: list = [None] * 256
    gens[1] = torch.Generator(device="cuda").manual_seed(11)
    out = Sampler()(logits, meta(params, gens, "cuda"))
    greedy = torch.tensor([i % 4 == 0 for i in range(256)], device="cuda")
    assert torch.equal(out.token_ids[greedy], logits.argmax(-1)[greedy])
    alone = Sampler()(
        logits[1:2],
        meta([params[1]], [torch.Generator(device="cuda").manual_seed(11)], "cuda"),
    )
    assert int(alone.token_ids[0]) == int(out.token_ids[1])


def test_large_top_k_takes_the_sort_path_and_keeps_exactly_k() -> None:
    from vattention.engine.sampler import TOPK_SORT_THRESHOLD

    torch.manual_seed(3)
    logits = torch.randn(2, 5000)
    k = TOPK_SORT_THRESHOLD + 500
    probs = Sampler().probs(logits, meta([SP(top_k=k), SP(top_k=3)]))
    assert (probs[0] > 0).sum() == k and (probs[1] > 0).sum() == 3
    assert set(torch.nonzero(probs[0]).flatten().tolist()) == set(
        logits[0].topk(k).indices.tolist()
    )


def test_metadata_for_requests_uses_each_requests_own_generator() -> None:
    from vattention.engine.request import Request

    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))

    def run() -> list[int]:
        reqs = [Request("a", [1], SP(seed=5)), Request("b", [1], SP(temperature=0, seed=6))]
        out = []
        for _ in range(4):  # the generator advances from step to step
            m = SamplingMetadata.for_requests(reqs, "cpu")
            assert list(m.generators) == [0]  # greedy rows never draw
            out.append(int(Sampler()(logits, m).token_ids[0]))
        assert reqs[0].generator("cpu") is reqs[0].generator("cpu")
        assert reqs[1].generator("cpu") is not None
        return out

    first = run()
    assert first == run() and len(set(first)) > 1
