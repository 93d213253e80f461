"""Prefix caching in the scheduler: page keys of a request's tokens, hits at admission,
publishing of full pages after each step (the cache side is `VirtualKVCache.cache_pages` /
`map_cached`: zero-copy, one physical page mapped into every slot that shares it).

A key names one page-sized block of tokens *and everything before it*: key i is a hash of
(key i-1, the block's token ids), a chain, so equal keys mean equal prefixes (as vLLM's block
hashes). Keys are built once per block and kept on the request (`Request.block_keys`).

Rules (the invariants the scheduler keeps):
- a hit covers whole pages and never the last token of the request's known tokens, which
  must be computed to produce logits: at most `(num_tokens - 1) // tokens_per_page` pages;
- only pages whose tokens all have K/V written by launched steps (`num_computed_tokens`) and
  known ids (no placeholder) are published, before the request's slot is freed;
- a request's published count is per slot: it restarts at 0 when the request loses its slot;
- a request that still needs prompt log-probabilities (`Request.needs_prompt_logprobs`) takes
  no hit and is not counted as a lookup: tokens served from the cache have no logits (vLLM
  does the same); its own pages are published as any request's.
"""

from __future__ import annotations

from typing import Any

from vattention.engine.request import Request


def extend_keys(r: Request, num_pages: int, per_page: int) -> list[int]:
    """`r.block_keys` extended to at least `num_pages` keys of its known tokens."""
    keys = r.block_keys
    ids = r.all_token_ids
    while len(keys) < num_pages:
        i = len(keys)
        block = ids[i * per_page : (i + 1) * per_page]
        keys.append(hash((keys[-1] if keys else 0, *block)))
    return keys


def sharing_problem(cache: Any) -> str | None:
    """Why `cache` cannot share prefix pages, or None when it can."""
    if not callable(getattr(cache, "map_cached", None)):
        return f"prefix caching needs a KV cache that shares pages; {type(cache).__name__} has none"
    try:
        cache.tokens_per_page  # noqa: B018 - raises where pages split tokens
    except ValueError as e:
        return str(e)
    return None


class PrefixCaching:
    """The scheduler's side of prefix caching over a cache with `map_cached`/`cache_pages`."""

    def __init__(self, cache: Any) -> None:
        problem = sharing_problem(cache)
        if problem is not None:
            raise ValueError(problem)
        self.cache = cache
        self.per_page: int = cache.tokens_per_page
        self.query_tokens = 0  # prompt tokens looked up at admission
        self.hit_tokens = 0  # of them, served from the cache (no prefill)

    def cached_keys(self, r: Request) -> list[int]:
        """Keys of `r`'s leading pages the cache holds (nothing counted: an admission that
        fails looks again at the next step); none for a request that needs prompt
        log-probabilities."""
        if r.prompt_logprobs is not None and r.needs_prompt_logprobs:
            return []
        known = r.num_tokens - r.num_inflight
        pages = (known - 1) // self.per_page
        if pages <= 0:
            return []
        keys = extend_keys(r, pages, self.per_page)[:pages]
        return keys[: self.cache.cached_prefix(keys)]

    def admitted(self, r: Request, keys: list[int]) -> int:
        """`r` was admitted into a slot that maps the pages of `keys`: count the lookup (its
        known tokens, and those served from the cache); returns the tokens they hold."""
        if r.prompt_logprobs is not None and r.needs_prompt_logprobs:
            r.num_published_pages = 0  # not looked up (see the rules)
            return 0
        self.query_tokens += r.num_tokens - r.num_inflight
        tokens = len(keys) * self.per_page
        self.hit_tokens += tokens
        r.num_published_pages = len(keys)  # those pages are in the table already
        return tokens

    def likely_hit(self, r: Request) -> bool:
        """Whether `r`'s first page is cached (one lookup): its slot will map shared pages
        there, so preparing private pages for it ahead of admission would be wasted."""
        if r.num_tokens - r.num_inflight <= self.per_page:
            return False
        if r.prompt_logprobs is not None and r.needs_prompt_logprobs:
            return False
        return self.cache.cached_prefix(extend_keys(r, 1, self.per_page)[:1]) > 0

    def publish(self, r: Request, slot: int) -> None:
        """Publish `r`'s full pages whose K/V is written and whose ids are known."""
        ready = min(r.num_computed_tokens, r.num_tokens - r.num_inflight) // self.per_page
        if ready <= r.num_published_pages:
            return
        keys = extend_keys(r, ready, self.per_page)[:ready]
        self.cache.cache_pages(slot, keys, start=r.num_published_pages)
        r.num_published_pages = ready
