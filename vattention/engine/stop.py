"""Stop conditions, checked after each sampled token is appended to a request.

Order (the first that holds decides): a structured-output request's grammar ended (its
matcher terminated: complete, then a stop token; `engine.structured`), end-of-sequence token (unless `ignore_eos`), a stop token
id, a stop string (none of these three before `min_tokens` tokens) (searched only where the new text could complete one; the output text is cut
just before it, or just after it with `include_stop_str_in_output`), `max_tokens` generated, the model's length limit reached. The matching stop
token or string is recorded in `request.stop_reason`.
"""

from __future__ import annotations

from collections.abc import Sequence

from vattention.engine.request import FinishReason, Request


def find_stop_string(text: str, num_new_chars: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends in the last `num_new_chars` characters of `text`.

    Returns (index where it starts, the string) or None. Older text was searched before, so
    only matches that overlap the new characters are looked for.
    """
    if num_new_chars <= 0 or not stops:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, len(text) - num_new_chars - longest + 1)
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def check_stop(
    request: Request, token_id: int, new_text: str, max_model_len: int
) -> FinishReason | None:
    """Why `request` must stop after `token_id` (just appended, adding `new_text`), or None.

    Cheap when only the length limits can apply (`request.length_stops_only`)."""
    params = request.params
    if not request.length_stops_only:  # (a structured-output request never is)
        guided = request.guided
        if guided is not None and guided.finished:
            request.stop_reason = None if guided.rejected is None else token_id
            return FinishReason.STOP
        if len(request.output_token_ids) >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                request.stop_reason = None
                return FinishReason.STOP
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return FinishReason.STOP
            if params.stop and new_text:
                hit = find_stop_string(request.output_text, len(new_text), params.stop)
                if hit is not None:
                    keep = len(hit[1]) if params.include_stop_str_in_output else 0
                    request.trim_text(hit[0] + keep)
                    request.stop_reason = hit[1]
                    return FinishReason.STOP
    limit = request.params.max_tokens
    if limit is not None and len(request.output_token_ids) >= limit:
        return FinishReason.LENGTH
    # Tokens still in flight (placeholders of later launched steps) do not count yet: each
    # is checked when it arrives, so async scheduling ends at the same length as sync.
    if len(request.all_token_ids) - request.num_inflight >= max_model_len:
        return FinishReason.LENGTH
    return None
