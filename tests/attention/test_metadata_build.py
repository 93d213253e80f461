"""`AttentionMetadata.build` (vectorised, one host buffer) equals a straightforward per-token
reference on random batches, paged and not, and keeps its input checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vattention.attention import AttentionMetadata


def reference(
    slots: list[int],
    context_lens: list[int],
    query_lens: list[int],
    block_tables: list[list[int]] | None = None,
    block_size: int = 0,
) -> dict[str, object]:
    """The fields, computed token by token in Python (what `build` did before it was vectorised)."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    tok_slots: list[int] = []
    tok_pos: list[int] = []
    for s, c, q in zip(slots, context_lens, query_lens, strict=True):
        tok_slots += [s] * q
        tok_pos += range(c, c + q)
    want: dict[str, object] = {
        "slots": torch.tensor(slots, dtype=torch.int32),
        "query_start_loc": torch.tensor(starts, dtype=torch.int32),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "context_lens": torch.tensor(context_lens, dtype=torch.int32),
        "token_slots": torch.tensor(tok_slots, dtype=torch.int64),
        "token_positions": torch.tensor(tok_pos, dtype=torch.int64),
        "max_query_len": max(query_lens),
        "max_seq_len": max(seq_lens),
        "slots_host": slots,
        "query_lens_host": query_lens,
        "seq_lens_host": seq_lens,
        "block_tables": None,
        "slot_mapping": None,
        "block_size": block_size,
    }
    if block_tables is not None:
        width = max(1, max(len(row) for row in block_tables))
        rows = [row + [0] * (width - len(row)) for row in block_tables]
        want["block_tables"] = torch.tensor(rows, dtype=torch.int32).view(len(rows), width)
        flat = []
        for row, c, q in zip(block_tables, context_lens, query_lens, strict=True):
            flat += [row[p // block_size] * block_size + p % block_size for p in range(c, c + q)]
        want["slot_mapping"] = torch.tensor(flat, dtype=torch.int64)
    return want


def assert_matches(meta: AttentionMetadata, want: dict[str, object]) -> None:
    for name, value in want.items():
        got = getattr(meta, name)
        if isinstance(value, torch.Tensor):
            assert isinstance(got, torch.Tensor), name
            assert got.dtype == value.dtype and got.shape == value.shape, name
            assert got.is_contiguous(), name
            assert torch.equal(got, value), name
        else:
            assert got == value, name
            assert type(got) is type(value), name
    for name in ("max_query_len", "max_seq_len"):
        assert type(getattr(meta, name)) is int
    assert all(type(x) is int for x in meta.seq_lens_host)


@st.composite
def batches(draw: st.DrawFn, paged: bool) -> tuple:
    n = draw(st.integers(1, 12))
    slots = draw(st.lists(st.integers(0, 63), min_size=n, max_size=n, unique=True))
    decode = draw(st.booleans())
    query_lens = [1] * n if decode else draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    context_lens = draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    if not paged:
        return slots, context_lens, query_lens, None, 0
    block_size = draw(st.sampled_from([1, 4, 16]))
    tables = []
    for c, q in zip(context_lens, query_lens, strict=True):
        need = -(-(c + q) // block_size) + draw(st.integers(0, 3))  # room to spare, or not
        tables.append(draw(st.lists(st.integers(0, 5000), min_size=need, max_size=need)))
    return slots, context_lens, query_lens, tables, block_size


@settings(max_examples=60, deadline=None)
@given(batch=batches(paged=False))
def test_build_equals_the_reference(batch: tuple) -> None:
    slots, ctx, q, _, _ = batch
    assert_matches(AttentionMetadata.build(slots, ctx, q), reference(slots, ctx, q))


@settings(max_examples=60, deadline=None)
@given(batch=batches(paged=True))
def test_paged_build_equals_the_reference(batch: tuple) -> None:
    slots, ctx, q, tables, bs = batch
    meta = AttentionMetadata.build(slots, ctx, q, "cpu", tables, bs)
    assert_matches(meta, reference(slots, ctx, q, tables, bs))


@settings(max_examples=40, deadline=None)
@given(batch=batches(paged=True))
def test_paged_build_from_a_padded_table_array(batch: tuple) -> None:
    """`PagedKVCache.block_table_array`'s form (rows padded with block 0 to one width) gives
    the same slot mapping and the same used part of every table as lists."""
    import numpy as np

    slots, ctx, q, tables, bs = batch
    width = max(len(t) for t in tables) + 2
    array = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        array[i, : len(t)] = t
    meta = AttentionMetadata.build(slots, ctx, q, "cpu", array, bs)
    want = AttentionMetadata.build(slots, ctx, q, "cpu", tables, bs)
    assert torch.equal(meta.slot_mapping, want.slot_mapping)
    assert meta.block_tables is not None and want.block_tables is not None
    for i, (c, n) in enumerate(zip(ctx, q, strict=True)):
        used = -(-(c + n) // bs)
        assert meta.block_tables[i, :used].tolist() == list(tables[i][:used])
    with pytest.raises(ValueError, match="too narrow"):
        AttentionMetadata.build(slots, ctx, q, "cpu", array[:, :0], bs)


def test_every_field_lives_in_one_buffer() -> None:
    """One host buffer (so one host-to-device copy); every field starts 16-byte aligned."""
    meta = AttentionMetadata.build(
        [3, 1, 2], [5, 0, 9], [1, 7, 2], "cpu", [[4, 5], [1, 2], [7, 8, 9]], 4
    )
    tensors = [
        meta.slots,
        meta.query_start_loc,
        meta.seq_lens,
        meta.context_lens,
        meta.token_slots,
        meta.token_positions,
        meta.block_tables,
        meta.slot_mapping,
    ]
    assert all(t is not None for t in tensors)
    storages = {t.untyped_storage().data_ptr() for t in tensors if t is not None}
    assert len(storages) == 1
    assert all(t.data_ptr() % 16 == 0 for t in tensors if t is not None)
    # A fresh buffer per call: an earlier step's metadata is never overwritten.
    again = AttentionMetadata.build([0], [0], [1])
    assert again.slots.untyped_storage().data_ptr() not in storages
    assert meta.slots.tolist() == [3, 1, 2]


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="non-empty and equal length"):
        AttentionMetadata.build([], [], [])
    with pytest.raises(ValueError, match="non-empty and equal length"):
        AttentionMetadata.build([0, 1], [0], [1, 1])
    with pytest.raises(ValueError, match="a slot appears twice"):
        AttentionMetadata.build([2, 2], [0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"context_len >= 0 and query_len >= 1, got 4, 0"):
        AttentionMetadata.build([0, 1, 2], [0, 4, -1], [1, 0, 1])
    with pytest.raises(ValueError, match=r"got -1, 1"):
        AttentionMetadata.build([0, 1], [3, -1], [1, 1])
    with pytest.raises(ValueError, match="block_size must be given"):
        AttentionMetadata.build([0], [0], [1], "cpu", [[0]], 0)
    with pytest.raises(ValueError, match="block tables for"):
        AttentionMetadata.build([0, 1], [0, 0], [1, 1], "cpu", [[0]], 4)
    with pytest.raises(ValueError, match="too few"):
        AttentionMetadata.build([0], [4], [1], "cpu", [[0]], 4)  # 5 tokens, 1 block of 4
