"""The prefix cache's offload tiers (issue 21): blocks evicted from a small KV cache are kept
in host memory or on disk and loaded back for a later request with the same prefix.

- A prefix that left the device pool is a hit again through the host tier, and the greedy
  output equals an engine without any prefix cache.
- The disk tier survives a restart: the new engine's first request hits it.

Runs where the platform has the tier (supports_kv_offload); elsewhere it skips, saying so.
"""

from __future__ import annotations

import os
import random

import pytest
from piston import SamplingParams
from piston.hal.registry import get_platform

HERE = os.path.dirname(os.path.abspath(__file__))
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPT_LEN = 200  # 12 full blocks of 16 (the last token is always computed)
# 64 blocks of the tiny model's 12 KiB: five such prompts do not fit at once.
SMALL_POOL = dict(max_model_len=512, kv_cache_memory=64 * 12 * 1024, seed=0, dtype="float32")


@pytest.fixture(autouse=True)
def _needs_the_tier():
    platform = get_platform(None)
    if not platform.supports_kv_offload:
        pytest.skip(f"platform {platform.name} has no KV offload tier yet (supports_kv_offload=False)")


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(PROMPT_LEN)] for _ in range(n)]


def _run_one_at_a_time(llm, prompts):
    return [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16"])
def test_host_tier_brings_evicted_prefixes_back(kv_cache_dtype, tiny_models, make_llm):
    path = tiny_models("llama")
    prompts = _prompts(6, seed=1)
    # A float16 cache's blocks are half the bytes: half the memory makes the same 64 blocks.
    pool = {**SMALL_POOL, "kv_cache_dtype": kv_cache_dtype,
            "kv_cache_memory": SMALL_POOL["kv_cache_memory"] // (2 if kv_cache_dtype == "float16" else 1)}
    expected = [o.outputs[0].token_ids for o in
                _run_one_at_a_time(make_llm(path, enable_prefix_caching=False, **pool), prompts)]

    llm = make_llm(path, kv_offloading_size="4MiB", **pool)
    assert llm.llm_engine.get_num_total_blocks() == 64
    first = _run_one_at_a_time(llm, prompts)  # later prompts push the first ones out of the pool
    again = _run_one_at_a_time(llm, prompts[:2])
    assert [o.outputs[0].token_ids for o in first] == expected
    assert [o.outputs[0].token_ids for o in again] == expected[:2]
    assert [o.num_cached_tokens for o in first] == [0] * 6
    # Prompt 0 left the pool (five prompts of 13 blocks came after it): its hit is the tier's.
    assert [o.num_cached_tokens for o in again] == [192, 192]


def test_without_the_tier_the_evicted_prefix_is_computed_again(tiny_models, make_llm):
    """The control for the test above: the same run without the tier has no hit."""
    path = tiny_models("llama")
    prompts = _prompts(6, seed=1)
    llm = make_llm(path, **SMALL_POOL)
    _run_one_at_a_time(llm, prompts)
    assert _run_one_at_a_time(llm, prompts[:1])[0].num_cached_tokens == 0


def test_disk_tier_survives_a_restart(tiny_models, make_llm, tmp_path):
    path = tiny_models("llama")
    [prompt] = _prompts(1, seed=2)
    tier = dict(kv_offloading_dir=str(tmp_path), kv_offloading_disk_size="1MiB")
    llm = make_llm(path, **tier, **SMALL_POOL)
    [out] = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert out.num_cached_tokens == 0
    llm.llm_engine.shutdown()
    files = [p for p in tmp_path.rglob("*.kv")]
    assert len(files) == (PROMPT_LEN + 11) // 16  # every full block of prompt and output, one file each

    restarted = make_llm(path, **tier, **SMALL_POOL)
    [again] = restarted.generate([prompt], GREEDY, use_tqdm=False)
    assert again.num_cached_tokens == 192
    assert again.outputs[0].token_ids == out.outputs[0].token_ids

    # A weight change makes the stored KV stale: the tier is emptied, on disk too.
    restarted.reload_weights()
    assert not list(tmp_path.rglob("*.kv"))


def test_an_external_store_plugs_in_by_name(tiny_models, make_llm, tmp_path, monkeypatch):
    path = tiny_models("llama")
    log = tmp_path / "orders.txt"
    monkeypatch.setenv("PISTON_TEST_KV_LOG", str(log))
    # The engine process imports the store: it must find this folder's module.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    prompts = _prompts(6, seed=1)
    llm = make_llm(path, kv_offloading_size="4MiB", kv_offloading_backend="kv_store_ext:RecordingStore",
                   **SMALL_POOL)
    first = _run_one_at_a_time(llm, prompts)
    [again] = _run_one_at_a_time(llm, prompts[:1])
    assert again.num_cached_tokens == 192
    assert again.outputs[0].token_ids == first[0].outputs[0].token_ids
    orders = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert sum(s for s, _ in orders) > 0 and sum(n for _, n in orders) == 12  # prompt 0's 12 blocks came back
    with pytest.raises(ValueError, match="kv_offloading_backend='no_such_module:Store'"):
        make_llm(path, kv_offloading_size="4MiB", kv_offloading_backend="no_such_module:Store", **SMALL_POOL)


def test_host_tier_keeps_a_draft_models_kv(tiny_models, make_llm):
    """With a draft model (the target itself, so a right draft KV means every draft is
    accepted) the draft's KV layers travel with the target's through the host tier: prefixes
    loaded back draft as well as they did the first time."""
    platform = get_platform(None)
    if "draft_model" not in platform.draft_methods:
        pytest.skip(f"platform {platform.name} runs no draft models yet")
    path = tiny_models("llama")
    prompts = _prompts(6, seed=1)
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 3, "disable_by_batch_size": 0}
    pool = {**SMALL_POOL, "kv_cache_memory": 2 * SMALL_POOL["kv_cache_memory"]}  # the draft's layers double a block
    llm = make_llm(path, kv_offloading_size="8MiB", speculative_config=spec, **pool)
    assert llm.llm_engine.get_num_total_blocks() == 64
    first = _run_one_at_a_time(llm, prompts)
    before = llm.llm_engine.get_stats()
    again = _run_one_at_a_time(llm, prompts[:2])
    after = llm.llm_engine.get_stats()
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first[:2]]
    assert [o.num_cached_tokens for o in again] == [192, 192]  # hits from the host tier
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    assert drafted > 0 and accepted == drafted, (accepted, drafted)
