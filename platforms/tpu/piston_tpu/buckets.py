"""Shape buckets: the fixed set of padded sizes XLA compiles programs for.

A step's tokens are padded up to the next token bucket and its sampling rows up to the
next request bucket, so a whole run uses only the programs compiled at start-up.
Both lists are powers of two, capped by what the engine config allows.
"""

from __future__ import annotations

import bisect

MIN_TOKEN_BUCKET = 16  # fewer tokens would only waste a TPU's 8x128 tiles
MIN_REQUEST_BUCKET = 8  # one sublane tile of rows


def power_of_two_buckets(smallest: int, largest: int) -> list[int]:
    """Powers of two from ``smallest`` up to the first one >= ``largest``."""
    if largest < 1:
        raise ValueError(f"a bucket list needs a positive upper bound, got {largest}")
    buckets = [smallest]
    while buckets[-1] < largest:
        buckets.append(buckets[-1] * 2)
    return buckets


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """Token-count buckets: 16, 32, ... up to max_num_batched_tokens (rounded up)."""
    return power_of_two_buckets(MIN_TOKEN_BUCKET, max_num_batched_tokens)


def request_buckets(max_num_seqs: int) -> list[int]:
    """Request-count buckets: 8, 16, ... up to max_num_seqs (rounded up)."""
    return power_of_two_buckets(MIN_REQUEST_BUCKET, max_num_seqs)


def pick_bucket(buckets: list[int], n: int) -> int:
    """The smallest bucket that holds ``n``; ValueError when none does."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest compiled bucket ({buckets[-1]}); "
                         "the scheduler must not send more than the engine config allows.")
    return buckets[i]
