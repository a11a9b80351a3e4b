"""KVCacheManager: prefix hits, allocation, reference counts, eviction order, no leaks."""

import pytest
from piston.core.kv_cache_manager import KVCacheManager
from piston.core.request import Request
from piston.step.sampling_params import SamplingParams

BS = 4


def make_request(req_id, tokens, **params):
    return Request(req_id, tokens, SamplingParams(**params))


def run_prefill(kv, req):
    """Look up the prefix, allocate the rest and mark it computed, as the scheduler does."""
    hit, n_hit = kv.get_computed_blocks(req)
    ids = kv.allocate_slots(req, req.num_tokens - n_hit, hit, n_hit)
    assert ids is not None
    req.num_computed_tokens = req.num_tokens
    return hit, n_hit


def test_prefix_hit_skips_computed_blocks():
    kv = KVCacheManager(16, BS)
    a = make_request("a", list(range(10)))
    run_prefill(kv, a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hit, n_hit = kv.get_computed_blocks(b)
    assert n_hit == 8
    assert [blk.block_id for blk in hit] == kv.get_block_ids("a")[0][:2]


def test_partial_hit_stops_at_first_differing_block():
    kv = KVCacheManager(16, BS)
    run_prefill(kv, make_request("a", list(range(12))))
    b = make_request("b", [0, 1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11, 12])
    _, n_hit = kv.get_computed_blocks(b)
    assert n_hit == 4


def test_fully_cached_prompt_still_computes_last_token():
    kv = KVCacheManager(16, BS)
    run_prefill(kv, make_request("a", list(range(8))))
    b = make_request("b", list(range(8)))
    hit, n_hit = kv.get_computed_blocks(b)
    assert n_hit == 4 and len(hit) == 1
    (ids,) = kv.allocate_slots(b, 4, hit, n_hit)
    assert ids[0] == kv.get_block_ids("a")[0][0] and len(ids) == 2


def test_no_hit_when_caching_disabled_or_prompt_logprobs_requested():
    kv = KVCacheManager(16, BS, enable_caching=False)
    run_prefill(kv, make_request("a", list(range(9))))
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    kv = KVCacheManager(16, BS)
    run_prefill(kv, make_request("a", list(range(9))))
    assert kv.get_computed_blocks(make_request("b", list(range(9)), prompt_logprobs=1)) == ([], 0)


def test_hit_rate_counts_tokens():
    kv = KVCacheManager(16, BS)
    run_prefill(kv, make_request("a", list(range(9))))
    run_prefill(kv, make_request("b", list(range(9))))
    # 18 tokens queried, 8 hit.
    assert kv.prefix_cache_hit_rate == pytest.approx(8 / 18)
    kv.reset_prefix_cache()
    assert kv.prefix_cache_hit_rate == 0.0
    assert kv.get_computed_blocks(make_request("c", list(range(9))))[1] == 0


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(8)))
    run_prefill(kv, a)
    b = make_request("b", list(range(20)))
    before = kv.block_pool.get_num_free_blocks()
    assert kv.allocate_slots(b, 20) is None
    assert kv.block_pool.get_num_free_blocks() == before
    assert kv.get_block_ids("b") == [[]]
    # A hit on evictable blocks counts them as free, but not twice.
    kv.free(a)
    c = make_request("c", list(range(8)) + list(range(100, 112)))
    hit, n_hit = kv.get_computed_blocks(c)
    assert n_hit == 8
    assert kv.allocate_slots(c, 12, hit, n_hit) is None
    assert all(blk.ref_cnt == 0 for blk in hit)
    assert kv.block_pool.get_num_free_blocks() == 4


def test_allocate_returns_only_new_block_ids_and_grows_by_block():
    kv = KVCacheManager(8, BS)
    r = make_request("r", list(range(3)))
    assert kv.allocate_slots(r, 3) == [[0]]
    r.num_computed_tokens = 3
    r.append_output_token_ids([7])
    assert kv.allocate_slots(r, 1) == [[]]
    r.num_computed_tokens = 4
    r.append_output_token_ids([8])
    assert kv.allocate_slots(r, 1) == [[1]]
    assert kv.get_block_ids("r") == [[0, 1]]


def test_generated_tokens_that_fill_a_block_become_cacheable():
    kv = KVCacheManager(8, BS)
    r = make_request("r", [1, 2, 3])
    run_prefill(kv, r)
    r.append_output_token_ids([4])
    kv.allocate_slots(r, 1)
    other = make_request("o", [1, 2, 3, 4, 5])
    assert kv.get_computed_blocks(other)[1] == 4


def test_shared_prefix_reference_counts_and_common_prefix_blocks():
    kv = KVCacheManager(16, BS)
    a = make_request("a", list(range(9)))
    b = make_request("b", list(range(9)))
    run_prefill(kv, a)
    run_prefill(kv, b)
    blocks_a = kv.req_to_blocks["a"]
    assert [blk.ref_cnt for blk in blocks_a] == [2, 2, 1]
    assert kv.get_num_common_prefix_blocks(a, 2) == 2
    kv.free(a)
    assert [blk.ref_cnt for blk in kv.req_to_blocks["b"]][:2] == [1, 1]
    assert kv.get_num_common_prefix_blocks(b, 1) == 3


def test_eviction_is_lru_and_evicts_a_sequence_tail_first():
    kv = KVCacheManager(6, BS)
    old = make_request("old", list(range(12)))  # blocks 0,1,2 (all full, cached)
    run_prefill(kv, old)
    kv.free(old)
    new = make_request("new", list(range(100, 112)))  # blocks 3,4,5
    run_prefill(kv, new)
    kv.free(new)
    order = [blk.block_id for blk in kv.block_pool.free_block_queue]
    assert order == [2, 1, 0, 5, 4, 3]
    # Needing 2 blocks evicts old's last two blocks; its first block still hits.
    kv.allocate_slots(make_request("x", list(range(200, 208))), 8)
    assert kv.get_computed_blocks(make_request("p", list(range(12)) + [1]))[1] == 4
    assert kv.get_computed_blocks(make_request("q", list(range(100, 112)) + [1]))[1] == 12


def test_no_blocks_leak_after_finish_or_abort():
    kv = KVCacheManager(10, BS)
    reqs = [make_request(f"r{i}", list(range(i, i + 7))) for i in range(4)]
    for r in reqs:
        run_prefill(kv, r)
    partial = make_request("partial", list(range(50)))
    assert kv.allocate_slots(partial, 8) is not None  # an aborted mid-prefill request
    for r in reqs + [partial]:
        kv.free(r)
    kv.free(make_request("never", [1]))
    assert kv.block_pool.get_num_free_blocks() == 10
    assert kv.usage == 0.0
    assert all(blk.ref_cnt == 0 for blk in kv.block_pool.blocks)
