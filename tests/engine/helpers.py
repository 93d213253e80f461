"""Test helpers for the engine: a page-counting fake KV cache, a tiny tokenizer and a fake model
that drives a scheduler to completion while checking the K/V contract of every row."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from vattention.engine.request import PLACEHOLDER, Request
from vattention.engine.scheduler import Scheduler
from vattention.engine.scheduling import SchedulerOutput
from vattention.memory.errors import OutOfKVMemory


class FakeKVCache:
    """Slots plus a page budget; pages go back to the budget as soon as a slot is freed.

    With `batched=True` it also has the all-or-nothing `step(lengths)` of the real caches."""

    def __init__(
        self, num_slots: int, num_pages: int, page_size: int = 4, batched: bool = False
    ) -> None:
        self.num_slots, self.num_pages, self.page_size = num_slots, num_pages, page_size
        if batched:
            self.step = self._step
        self.step_calls = 0
        self.used = [False] * num_slots
        self.pages = [0] * num_slots
        self.lengths = [0] * num_slots
        self.ensure_calls: list[tuple[int, int]] = []

    def alloc_slot(self, prefix: Sequence[Hashable] = (), tokens: int | None = None) -> int:
        assert not prefix, "this fake cache shares no pages"
        for s, used in enumerate(self.used):
            if not used:
                self.used[s] = True
                return s
        raise OutOfKVMemory("no free slot")

    def length(self, slot: int) -> int:
        if not self.used[slot]:
            raise ValueError(f"slot {slot} is not in use")
        return self.lengths[slot]

    def free_slot(self, slot: int) -> None:
        if not self.used[slot]:
            raise ValueError(f"slot {slot} is not in use")
        self.used[slot], self.pages[slot], self.lengths[slot] = False, 0, 0

    def ensure(self, slot: int, num_tokens: int) -> None:
        if not self.used[slot]:
            raise ValueError(f"slot {slot} is not in use")
        self.ensure_calls.append((slot, num_tokens))
        need = -(-num_tokens // self.page_size)
        extra = max(0, need - self.pages[slot])
        if extra > self.free_pages:
            raise OutOfKVMemory("out of pages", pages_needed=extra, pages_available=self.free_pages)
        self.pages[slot] += extra
        self.lengths[slot] = max(self.lengths[slot], num_tokens)

    def _step(self, lengths: dict[int, int]) -> None:
        self.step_calls += 1
        need = 0
        for slot, n in lengths.items():
            if not self.used[slot]:
                raise ValueError(f"slot {slot} is not in use")
            need += max(0, -(-n // self.page_size) - self.pages[slot])
        if need > self.free_pages:
            raise OutOfKVMemory("out of pages", pages_needed=need, pages_available=self.free_pages)
        for slot, n in lengths.items():
            self.pages[slot] = max(self.pages[slot], -(-n // self.page_size))
            self.lengths[slot] = max(self.lengths[slot], n)

    @property
    def used_pages(self) -> int:
        return sum(self.pages)

    @property
    def free_pages(self) -> int:
        return self.num_pages - self.used_pages

    @property
    def used_slots(self) -> int:
        return sum(self.used)


def next_token(tokens: Iterable[int], vocab: int = 50, avoid: int | None = None) -> int:
    """A deterministic 'model': the next token is a hash of the whole history."""
    digest = hashlib.blake2b(repr(list(tokens)).encode(), digest_size=8).digest()
    token = int.from_bytes(digest, "little") % vocab
    return (token + 1) % vocab if token == avoid else token


class FakeModel:
    """Runs scheduler outputs: keeps what K/V each slot would hold and checks every row's start."""

    def __init__(self, vocab: int = 50, avoid: int | None = None) -> None:
        self.vocab, self.avoid = vocab, avoid
        self.kv: dict[int, list[int]] = {}

    def run(self, out: SchedulerOutput) -> list[int]:
        for s in out.scheduled:
            held = self.kv.get(s.slot, [])
            known = s.request.all_token_ids
            assert held[: s.start] == known[: s.start], f"stale K/V under {s.request}"
            new = s.token_ids()
            assert len(new) == s.num_new_tokens
            if new[0] == PLACEHOLDER:  # in flight: what the step before sampled (on "device")
                assert PLACEHOLDER not in known[: s.start] and len(new) == 1
                new = [next_token(known[: s.start], self.vocab, self.avoid)]
            assert PLACEHOLDER not in new
            self.kv[s.slot] = held[: s.start] + new
        return [
            next_token(self.kv[s.slot][: s.context_len], self.vocab, self.avoid)
            for s in out.sampling
        ]


def drive(
    scheduler: Scheduler, model: FakeModel | None = None, max_steps: int = 10_000
) -> list[Request]:
    """Step until nothing is left; returns the finished requests in finishing order."""
    model = model or FakeModel()
    finished: list[Request] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return finished
        out = scheduler.schedule()
        finished += scheduler.update(out, model.run(out))
    raise AssertionError(f"not finished after {max_steps} steps")


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges (one token per UTF-8 byte) plus an `<eos>` special token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return tok


def word_tokenizer() -> Tokenizer:
    """Whole words with a SentencePiece-style `▁` space marker (the decoder drops a leading one)."""
    words = ["<unk>", "▁hello", "▁world", "▁big", "!", "<eos>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(["<eos>"])
    return tok
