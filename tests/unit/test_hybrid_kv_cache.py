"""The hybrid KV cache (vLLM's KV cache groups): the layout of a model that mixes full and
sliding-window layers, the per-group manager, and the scheduler driving it against the
simulated KV cache of tests/unit/test_scheduler.py's FakeWorker (each group writes and reads
through its own block table, and a block is the same memory whichever group holds it)."""

from types import SimpleNamespace

import pytest
from piston.core.block_hash import update_request_block_hashes
from piston.core.hybrid_kv_cache_manager import HybridKVCacheManager
from piston.core.scheduler import Scheduler
from piston.step.config import SpeculativeConfig
from piston.step.kv_cache_layout import blocks_per_sequence, group_layers, kv_cache_layout
from test_scheduler import FakeWorker, assert_no_leak, make_config, make_request


def _gemma3(window, layers=6, pattern=3):
    """Config facts of a Gemma 3 text model: every ``pattern``-th layer global."""
    return SimpleNamespace(model_type="gemma3_text", num_hidden_layers=layers, sliding_window=window,
                           sliding_window_pattern=pattern)


def _config(hf_config, hybrid=True, **kwargs):
    config = make_config(hf_config=hf_config, **kwargs)
    config.cache_config.disable_hybrid_kv_cache_manager = not hybrid
    return config


# ---- the layout ---------------------------------------------------------------------------


def test_layers_are_cut_into_equal_groups_of_one_kind():
    # Gemma 3 270M: 18 layers, every sixth global -> 3 full, 15 sliding: six groups of 3.
    layout = group_layers([None if (i + 1) % 6 == 0 else 512 for i in range(18)])
    assert layout.num_cache_layers == 3 and layout.num_groups == 6
    assert [g.sliding_window for g in layout.groups] == [512] * 5 + [None]
    assert layout.groups[-1].layers == (5, 11, 17) and layout.groups[0].layers == (0, 1, 2)
    for g, group in enumerate(layout.groups):
        assert [layout.layer_cache[layer] for layer in group.layers] == list(range(len(group.layers)))
        assert all(layout.layer_group[layer] == g for layer in group.layers)
    # 26 layers (Gemma 3 1B): 4 full, 22 sliding -> groups of 4, the last sliding one of 2.
    layout = group_layers([None if (i + 1) % 6 == 0 else 512 for i in range(26)])
    assert layout.num_cache_layers == 4
    assert [len(g.layers) for g in layout.groups] == [4, 4, 4, 4, 4, 2, 4]


def test_uniform_models_keep_one_group():
    assert group_layers([None] * 4).num_groups == 1
    layout = group_layers([8] * 4)
    assert layout.num_groups == 1 and layout.groups[0].sliding_window == 8 and layout.num_cache_layers == 4


def test_hybrid_is_off_with_the_flag_a_draft_model_or_the_offload_tier():
    assert kv_cache_layout(_config(_gemma3(8))).hybrid
    assert not kv_cache_layout(_config(_gemma3(8), hybrid=False)).hybrid
    config = _config(_gemma3(8))
    config.speculative_config = SpeculativeConfig(method="draft_model", model="d", num_speculative_tokens=2)
    assert not kv_cache_layout(config).hybrid
    config = _config(_gemma3(8))
    config.cache_config.kv_offloading_size = 2**20
    layout = kv_cache_layout(config)
    assert not layout.hybrid and layout.groups[0].sliding_window is None  # keeps every block


def test_blocks_per_sequence_counts_every_group():
    layout = group_layers([8, 8, None, 8, 8, None])  # two sliding groups, one full
    # full: 64 / 4 = 16; each sliding: cdiv(8 - 1 + 16, 4) + 1 = 7
    assert blocks_per_sequence(layout, 64, 4, 16) == 16 + 2 * 7


# ---- the manager --------------------------------------------------------------------------


def _manager(num_blocks=64, caching=True):
    layout = group_layers([8, 8, None, 8, 8, None])  # groups: sliding, sliding, full
    return HybridKVCacheManager(num_blocks, 4, layout, caching)


def _prefill(kv, request):
    hit, n = kv.get_computed_blocks(request)
    ids = kv.allocate_slots(request, request.num_tokens - n, hit, n)
    assert ids is not None
    request.num_computed_tokens = request.num_tokens
    return ids, n


def test_every_group_gets_its_own_blocks_in_step():
    kv = _manager()
    a = make_request("a", 10)
    ids, _ = _prefill(kv, a)
    assert [len(g) for g in ids] == [3, 3, 3]
    flat = [b for g in ids for b in g]
    assert len(set(flat)) == 9  # distinct blocks of one pool
    assert kv.block_pool.get_num_free_blocks() == 64 - 9
    kv.free(a)
    assert kv.block_pool.get_num_free_blocks() == 64


def test_only_the_sliding_groups_release_blocks_behind_the_window():
    kv = _manager()
    a = make_request("a", 40)
    _prefill(kv, a)
    freed = kv.release_out_of_window([a])
    # the next query (position 40) reads from 33 on: blocks 0..7 end before it, in each sliding group
    assert freed == 16
    held = [len([b for b in g.req_to_blocks["a"] if b.ref_cnt > 0]) for g in kv.groups]
    assert held == [2, 2, 10]
    kv.free(a)
    assert kv.block_pool.get_num_free_blocks() == 64


def test_allocation_is_all_or_nothing():
    kv = _manager(num_blocks=8)
    a = make_request("a", 12)  # 3 blocks per group = 9 > 8
    hit, n = kv.get_computed_blocks(a)
    assert kv.allocate_slots(a, 12, hit, n) is None
    assert kv.block_pool.get_num_free_blocks() == 8
    assert kv.get_block_ids("a") == [[], [], []]


def test_prefix_hit_needs_every_group_and_groups_never_share_blocks():
    kv = _manager()
    prompt = [100 + i for i in range(40)]
    a = make_request("a", prompt=prompt)
    a_ids, _ = _prefill(kv, a)
    kv.free(a)
    b = make_request("b", prompt=prompt + [7])
    hit, n = kv.get_computed_blocks(b)
    assert n == 40
    # each group hits its own blocks, never another group's: the full group all ten, the
    # sliding groups the two their window reaches (RELEASED places, id 0, before them)
    assert [blk.block_id for blk in hit[2]] == a_ids[2]
    for g in (0, 1):
        assert [blk.block_id for blk in hit[g]] == [0] * 8 + a_ids[g][8:]
    # a full group that lost block 3 limits the hit to 3 blocks; the sliding groups, which then
    # need blocks 1 and 2 (the window of position 12 reaches back to 5), still have them.
    kv.block_pool.uncache([kv.groups[2].block_pool.get_cached_block(kv.groups[2].hashes(a)[3])])
    hit, n = kv.get_computed_blocks(b)
    assert n == 12 and [len(h) for h in hit] == [3, 3, 3]


def test_a_sliding_group_that_lost_its_window_shortens_the_hit():
    kv = _manager()
    prompt = [100 + i for i in range(40)]
    a = make_request("a", prompt=prompt)
    _prefill(kv, a)
    kv.free(a)
    g0 = kv.groups[0]
    update_request_block_hashes(a, 4, a.block_hash_extra_keys)
    # the first sliding group loses block 8: a hit of 10 blocks needs 8 and 9 (window of position
    # 40 from 33 on), so the hit falls back to 8 blocks, whose window needs blocks 6 and 7.
    kv.block_pool.uncache([g0.block_pool.get_cached_block(g0.hashes(a)[8])])
    b = make_request("b", prompt=prompt + [7])
    hit, n = kv.get_computed_blocks(b)
    assert n == 32 and [len(h) for h in hit] == [8, 8, 8]
    ids = kv.allocate_slots(b, 9, hit, n)
    assert [len(g) for g in ids] == [11, 11, 11]
    kv.free(b)
    assert kv.block_pool.get_num_free_blocks() == 64


# ---- the scheduler on the simulated KV cache --------------------------------------------


def _run(sched, reqs):
    for r in reqs:
        sched.add_request(r)
    worker, most = FakeWorker(sched), 0
    while sched.has_unfinished_requests():
        worker.step()
        most = max(most, sched.kv_cache_manager.block_pool.num_blocks
                   - sched.kv_cache_manager.block_pool.get_num_free_blocks())
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert_no_leak(sched)
    return most


@pytest.mark.parametrize("caching", [True, False])
def test_hybrid_scheduler_runs_long_prompts_reading_only_its_own_kv(caching):
    """Six 60-token prompts with 20 outputs on a model of 2 sliding groups (window 8) and a
    full one: the hybrid cache runs them without preempting in as many blocks as one group
    of the full model keeps, since the sliding groups hold a few blocks each; every request
    reads its own tokens in each group (the full group all of them, the sliding ones within the
    window) although freed blocks went to others."""
    def workload():
        return [make_request(f"r{i}", 60, max_tokens=20) for i in range(6)]

    hybrid = Scheduler(_config(_gemma3(8), num_blocks=160, budget=16, caching=caching))
    assert isinstance(hybrid.kv_cache_manager, HybridKVCacheManager)
    most = _run(hybrid, workload())
    assert hybrid.num_preemptions == 0
    # the full group holds 20 blocks per request (120), each sliding group at most ~8 per request
    assert most <= 120 + 2 * 6 * 8, most

    # One block table (the flag): a block is every layer's memory, so the same memory holds a
    # third as many blocks (3 cache layers of 6 per block in the hybrid layout).
    single = Scheduler(_config(_gemma3(8), hybrid=False, num_blocks=160 // 3, budget=16, caching=caching))
    _run(single, workload())
    assert single.num_preemptions > 0


def test_hybrid_prefix_hit_on_a_second_turn():
    sched = Scheduler(_config(_gemma3(8), num_blocks=128, budget=64))
    prompt = [100 + i for i in range(40)]
    sched.add_request(make_request("a", prompt=prompt, max_tokens=3))
    worker = FakeWorker(sched)
    worker.run_to_completion()
    kv = sched.kv_cache_manager
    sched.add_request(make_request("b", prompt=prompt + [7, 7, 7], max_tokens=2))
    out, _ = worker.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 40
    # the sliding groups hit only the blocks their window reaches; the places before are RELEASED
    assert [g.num_released.get("b", 0) for g in kv.groups] == [8, 8, 0]
    worker.run_to_completion()
    assert_no_leak(sched)


@pytest.mark.parametrize("caching", [True, False])
def test_hybrid_scheduler_under_pressure_with_preemption_and_prefix_hits(caching):
    """Tiny Gemma 3's layout (three sliding groups, window 12, one full; one layer each) in a
    cache that must preempt: resumed requests hit their own evictable blocks in every group,
    which no other group's fresh allocation may take first; then the same prompts again."""
    hf = SimpleNamespace(model_type="gemma3_text", num_hidden_layers=4, sliding_window=12,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                      "sliding_attention"])
    sched = Scheduler(make_config(num_blocks=90, block_size=16, budget=64, caching=caching, hf_config=hf,
                                  max_model_len=1024))
    lens = [600, 5, 7, 9, 30, 12, 6, 40]
    reqs = [make_request(f"r{i}", n, max_tokens=24) for i, n in enumerate(lens)]
    again = [make_request(f"{r.request_id}b", prompt=r.prompt_token_ids, max_tokens=24) for r in reqs[::-1]]
    worker = FakeWorker(sched)  # one simulated KV cache for both rounds (prefix hits read it)
    for batch in (reqs, again):
        for r in batch:
            sched.add_request(r)
        worker.run_to_completion()
        assert all(r.num_output_tokens == 24 for r in batch)
    assert sched.num_preemptions > 0
    assert_no_leak(sched)
