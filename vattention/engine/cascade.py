"""Cascade decoding: which rows of a decode step share a prefix, for `SharedPrefix`.

With prefix caching, requests behind one system prompt map the same physical pages first
(`VirtualKVCache`: one prefix segment; `PagedKVCache`: the same leading blocks). The split-K
decode kernel reads each request's context on its own, so 256 such requests read the prompt
256 times a step; with `EngineConfig.cascade_attention` a decode-only step attends every
sharer's query to the prompt in one launch, reading it once (`decode_kernels.SharedPrefix`).

`plan_cascade(cache, slots, seq_lens, paged)` asks the cache for its largest group of rows
that share leading pages (`shared_prefix`) and keeps it only where it pays: at least
`CASCADE_MIN_ROWS` rows whose own tokens go past the prefix, and a prefix of at least
`CASCADE_MIN_TOKENS`. It returns the rows' prefix lengths (the prefix's tokens for a member, 0
for any other row), the prefix's tokens and its leader (paged: the member's row index, whose
block-table row is read; contiguous: the member's slot). Invariant: a member's prefix pages
are the leader's physical pages, full and immutable (shared pages never take writes), so
reading the leader's copy is reading its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CASCADE_MIN_ROWS = 4
CASCADE_MIN_TOKENS = 256


def plan_cascade(
    cache: Any, slots: Sequence[int], seq_lens: Sequence[int] | np.ndarray, paged: bool
) -> tuple[np.ndarray, int, int] | None:
    """(per-row prefix lengths [len(slots)] int32, prefix tokens, leader) or None."""
    shared = getattr(cache, "shared_prefix", None)
    if shared is None or len(slots) < CASCADE_MIN_ROWS:
        return None
    found = shared(slots)
    if found is None:
        return None
    tokens, members = found
    if tokens < CASCADE_MIN_TOKENS:
        return None
    members = [i for i in members if seq_lens[i] > tokens]  # own tokens after it: the new one
    if len(members) < CASCADE_MIN_ROWS:
        return None
    lens = np.zeros(len(slots), dtype=np.int32)
    lens[members] = tokens
    leader = members[0] if paged else int(slots[members[0]])
    return lens, tokens, leader
