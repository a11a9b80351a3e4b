"""BlockPool, FreeBlockQueue and chained block hashing."""

import pytest
from piston.core.block_hash import ROOT_BLOCK_HASH, hash_block_tokens, update_request_block_hashes
from piston.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from piston.core.request import Request
from piston.step.sampling_params import SamplingParams


def make_request(req_id, tokens):
    return Request(req_id, tokens, SamplingParams(max_tokens=4))


def free_ids(pool):
    return [b.block_id for b in pool.free_block_queue]


def test_free_queue_popleft_remove_append_are_linked_list_ops():
    blocks = [KVCacheBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    assert q.num_free_blocks == 4
    assert q.popleft() is blocks[0]
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [1, 3]
    q.append(blocks[0])
    q.appendleft(blocks[2])
    assert [b.block_id for b in q] == [2, 1, 3, 0]
    assert q.num_free_blocks == 4
    for _ in range(4):
        q.popleft()
    with pytest.raises(ValueError):
        q.popleft()


def test_kv_cache_block_has_slots_and_no_dict():
    assert not hasattr(KVCacheBlock(0), "__dict__")


def test_new_blocks_come_from_lru_head_with_ref_one():
    pool = BlockPool(4, enable_caching=True)
    got = pool.get_new_blocks(2)
    assert [b.block_id for b in got] == [0, 1]
    assert all(b.ref_cnt == 1 for b in got)
    assert pool.get_num_free_blocks() == 2
    assert pool.get_usage() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pool.get_new_blocks(3)


def test_freed_hashed_blocks_go_to_tail_unhashed_to_head():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    a.block_hash = 123
    pool.cached_block_hash_to_block[123] = a
    pool.free_blocks([b, a])
    # b holds nothing reusable: reused first; a (cached) evicted last.
    assert free_ids(pool) == [1, 2, 3, 0]


def test_reused_block_evicts_its_cached_hash():
    pool = BlockPool(1, enable_caching=True)
    (blk,) = pool.get_new_blocks(1)
    req = make_request("r", [1, 2])
    update_request_block_hashes(req, 2)
    pool.cache_full_blocks(req, [blk], 0, 1)
    assert pool.get_cached_block(req.block_hashes[0]) is blk
    pool.free_blocks([blk])
    assert pool.get_cached_block(req.block_hashes[0]) is blk  # lazy: still a hit
    (again,) = pool.get_new_blocks(1)
    assert again is blk and blk.block_hash is None
    assert pool.get_cached_block(req.block_hashes[0]) is None


def test_touch_revives_evictable_block_and_counts_references():
    pool = BlockPool(3, enable_caching=True)
    (blk,) = pool.get_new_blocks(1)
    pool.free_blocks([blk])
    assert pool.get_num_free_blocks() == 3
    pool.touch([blk])
    assert blk.ref_cnt == 1 and pool.get_num_free_blocks() == 2
    pool.touch([blk])
    assert blk.ref_cnt == 2 and pool.get_num_free_blocks() == 2
    pool.free_blocks([blk])
    assert pool.get_num_free_blocks() == 2
    pool.free_blocks([blk])
    assert pool.get_num_free_blocks() == 3


def test_duplicate_hash_keeps_first_block_registered():
    pool = BlockPool(2, enable_caching=True)
    b1, b2 = pool.get_new_blocks(2)
    r1, r2 = make_request("a", [5, 6]), make_request("b", [5, 6])
    update_request_block_hashes(r1, 2)
    update_request_block_hashes(r2, 2)
    pool.cache_full_blocks(r1, [b1], 0, 1)
    pool.cache_full_blocks(r2, [b2], 0, 1)
    assert pool.get_cached_block(r1.block_hashes[0]) is b1
    assert b2.block_hash is None


def test_duplicate_of_an_evictable_block_takes_its_place():
    """A block computed again while the cached one is evictable (a hit that did not reach it)
    replaces it, so handing the old one out does not lose the prefix; the old one is reused
    first."""
    pool = BlockPool(3, enable_caching=True)
    b1, b2 = pool.get_new_blocks(2)
    r1, r2 = make_request("a", [5, 6]), make_request("b", [5, 6])
    update_request_block_hashes(r1, 2)
    update_request_block_hashes(r2, 2)
    pool.cache_full_blocks(r1, [b1], 0, 1)
    pool.free_blocks([b1])
    pool.cache_full_blocks(r2, [b2], 0, 1)
    assert pool.get_cached_block(r1.block_hashes[0]) is b2 and b1.block_hash is None
    assert free_ids(pool)[0] == b1.block_id
    (again,) = pool.get_new_blocks(1)
    assert again is b1 and pool.get_cached_block(r1.block_hashes[0]) is b2


def test_caching_disabled_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    (blk,) = pool.get_new_blocks(1)
    req = make_request("r", [1, 2])
    update_request_block_hashes(req, 2)
    pool.cache_full_blocks(req, [blk], 0, 1)
    assert pool.get_cached_block(req.block_hashes[0]) is None


def test_reset_prefix_cache_forgets_all_hashes():
    pool = BlockPool(2, enable_caching=True)
    (blk,) = pool.get_new_blocks(1)
    req = make_request("r", [1, 2])
    update_request_block_hashes(req, 2)
    pool.cache_full_blocks(req, [blk], 0, 1)
    pool.reset_prefix_cache()
    assert pool.get_cached_block(req.block_hashes[0]) is None and blk.block_hash is None


def test_block_hash_is_chained_and_sensitive_to_every_input():
    h = hash_block_tokens(ROOT_BLOCK_HASH, [1, 2, 3])
    assert h == hash_block_tokens(ROOT_BLOCK_HASH, [1, 2, 3])
    assert 0 <= h < 2**128
    assert h != hash_block_tokens(ROOT_BLOCK_HASH, [1, 2, 4])
    assert h != hash_block_tokens(h, [1, 2, 3])
    assert h != hash_block_tokens(ROOT_BLOCK_HASH, [1, 2, 3], extra_keys=("lora-a",))
    # Token bytes must not alias: 256 is not (0, 1).
    assert hash_block_tokens(ROOT_BLOCK_HASH, [256]) != hash_block_tokens(ROOT_BLOCK_HASH, [0, 1])


def test_request_block_hashes_are_incremental_over_generated_tokens():
    req = make_request("r", [1, 2, 3, 4, 5])
    update_request_block_hashes(req, 2)
    assert len(req.block_hashes) == 2
    first = list(req.block_hashes)
    req.append_output_token_ids([6])
    update_request_block_hashes(req, 2)
    assert req.block_hashes[:2] == first and len(req.block_hashes) == 3
    assert req.block_hashes[2] == hash_block_tokens(first[1], [5, 6])
