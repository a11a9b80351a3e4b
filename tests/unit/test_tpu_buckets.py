"""Shape buckets of the TPU platform: powers of two, capped by the engine config."""

from __future__ import annotations

import pytest

pytest.importorskip("jax")

from piston_tpu.buckets import pick_bucket, request_buckets, token_buckets  # noqa: E402


def test_token_buckets_are_powers_of_two_up_to_max_num_batched_tokens():
    assert token_buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert token_buckets(100) == [16, 32, 64, 128]  # the last one holds the whole budget
    assert token_buckets(16) == [16]
    assert token_buckets(3) == [16]


def test_request_buckets_are_powers_of_two_up_to_max_num_seqs():
    assert request_buckets(256) == [8, 16, 32, 64, 128, 256]
    assert request_buckets(5) == [8]
    assert request_buckets(9) == [8, 16]


def test_pick_bucket_takes_the_smallest_that_fits():
    b = token_buckets(2048)
    assert [pick_bucket(b, n) for n in (1, 16, 17, 600, 2048)] == [16, 16, 32, 1024, 2048]


def test_pick_bucket_rejects_counts_past_the_largest_bucket():
    with pytest.raises(ValueError, match="exceeds the largest compiled bucket"):
        pick_bucket([16, 32], 33)
