"""`kv_write.write_rows` (under the Triton interpreter here) stores exactly what torch's index
ops store, into per-layer caches, strided cross-layer views and paged pools, and nothing else."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vattention.attention.kv_write import usable, write_rows


def _new_rows(
    tokens: int, heads: int, dim: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as the model makes them (in the cache's dtype): strided column views of one
    fused qkv output."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (2 + 2) * heads * dim, generator=gen).to(dtype)
    k = qkv[:, 2 * heads * dim : 3 * heads * dim].view(tokens, heads, dim)
    v = qkv[:, 3 * heads * dim :].view(tokens, heads, dim)
    return k, v


@settings(max_examples=15, deadline=None)
@given(
    tokens=st.integers(1, 9),
    heads=st.sampled_from([1, 2, 3]),
    dim=st.sampled_from([8, 12]),
    cross_layer=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_contiguous_writes_equal_index_put(
    tokens: int, heads: int, dim: int, cross_layer: bool, dtype: torch.dtype, seed: int
) -> None:
    slots, max_len, layers = 4, 16, 3
    k, v = _new_rows(tokens, heads, dim, seed, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    flat = torch.randperm(slots * max_len, generator=gen)[:tokens]  # distinct (slot, pos)
    slot_idx, pos_idx = flat // max_len, flat % max_len
    if cross_layer:  # [slots, len, layers, K|V, heads, dim]: a layer's K is a strided view
        whole = torch.zeros(slots, max_len, layers, 2, heads, dim, dtype=dtype)
        kc, vc = whole[:, :, 1, 0], whole[:, :, 1, 1]
    else:
        whole = torch.zeros(2, slots, max_len, heads, dim, dtype=dtype)
        kc, vc = whole[0], whole[1]
    want = whole.clone()
    wk, wv = (want[:, :, 1, 0], want[:, :, 1, 1]) if cross_layer else (want[0], want[1])
    wk.index_put_((slot_idx, pos_idx), k.to(dtype))
    wv.index_put_((slot_idx, pos_idx), v.to(dtype))
    write_rows(k, v, kc, vc, slot_idx, pos_idx)
    assert torch.equal(whole, want)  # the rows written, every other element untouched


@settings(max_examples=10, deadline=None)
@given(tokens=st.integers(1, 9), block_size=st.sampled_from([1, 4, 16]), seed=st.integers(0, 99))
def test_paged_writes_equal_index_copy(tokens: int, block_size: int, seed: int) -> None:
    heads, dim, blocks = 2, 8, 12
    k, v = _new_rows(tokens, heads, dim, seed)
    mapping = torch.randperm(blocks * block_size, generator=torch.Generator().manual_seed(seed))
    mapping = mapping[:tokens]
    pools = torch.zeros(2, blocks, block_size, heads, dim)
    want = pools.clone()
    for pool, new in zip(want, (k, v), strict=True):
        pool.view(-1, heads, dim).index_copy_(0, mapping, new.contiguous())
    write_rows(k, v, pools[0], pools[1], mapping, block_size=block_size)
    assert torch.equal(pools, want)


def test_rules() -> None:
    k, v = _new_rows(2, 1, 8, 0)
    with pytest.raises(ValueError, match="block_size"):
        write_rows(k, v, torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), torch.tensor([0, 1]))
    write_rows(k[:0], v[:0], k, v, torch.tensor([], dtype=torch.int64))  # no tokens: no launch
    assert not usable(k, v)  # the CPU keeps torch's index ops (the interpreter is slow)
