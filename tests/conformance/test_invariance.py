"""Greedy outputs do not depend on how the engine schedules the work.

Each variant (chunk size, prefix caching, a KV cache so small that requests are
preempted, batch composition) must give the default engine's tokens exactly. The prompts
are the near-tie-free REFERENCE_PROMPTS, so exact equality is a fair demand.
"""

from __future__ import annotations

import pytest
from hf_reference import REFERENCE_PROMPTS, assert_no_near_ties, hf_config, hf_greedy
from marks import SLOW_ON_TPU
from piston import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
BLOCK_SIZE = 16
SHARED_PREFIX = REFERENCE_PROMPTS[8]  # 200 tokens: twelve full blocks
QUESTIONS = [" What did Alice see?", " Who is Alice?", " What colour were its eyes?"]


def _tokens(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


@pytest.fixture(scope="module")
def baseline(smollm2_llm) -> list[list[int]]:
    """The default engine's tokens for REFERENCE_PROMPTS."""
    return _tokens(smollm2_llm.generate(REFERENCE_PROMPTS, GREEDY, use_tqdm=False))


def test_chunked_prefill_with_16_token_budget_matches_default(
    baseline, make_llm, smollm2_path, smollm2_llm_kwargs
):
    llm = make_llm(smollm2_path, max_num_batched_tokens=16, **smollm2_llm_kwargs)
    assert _tokens(llm.generate(REFERENCE_PROMPTS, GREEDY, use_tqdm=False)) == baseline


def test_prefix_caching_off_matches_on(baseline, make_llm, smollm2_path, smollm2_llm_kwargs):
    llm = make_llm(smollm2_path, enable_prefix_caching=False, **smollm2_llm_kwargs)
    outputs = llm.generate(REFERENCE_PROMPTS, GREEDY, use_tqdm=False)
    assert _tokens(outputs) == baseline
    assert all(out.num_cached_tokens == 0 for out in outputs)


@SLOW_ON_TPU  # 25 s on the TPU plugin
def test_prefix_cache_hit_skips_shared_prefix_and_keeps_outputs(
    smollm2_llm, smollm2_path, smollm2_tokenizer
):
    first = smollm2_llm.generate(SHARED_PREFIX + QUESTIONS[0], GREEDY, use_tqdm=False)
    prompts = [SHARED_PREFIX + q for q in QUESTIONS[1:]]
    second = smollm2_llm.generate(prompts, GREEDY, use_tqdm=False)

    for out in second:
        common = 0
        for a, b in zip(out.prompt_token_ids, first[0].prompt_token_ids):
            if a != b:
                break
            common += 1
        full_blocks = common // BLOCK_SIZE * BLOCK_SIZE
        assert full_blocks >= 12 * BLOCK_SIZE
        assert full_blocks <= out.num_cached_tokens < len(out.prompt_token_ids)
    # Computed from scratch by transformers, the continuation must be the same.
    reference = hf_greedy(smollm2_path, [smollm2_tokenizer(p).input_ids for p in prompts], 24)
    assert_no_near_ties(reference)
    assert _tokens(second) == [ref.token_ids for ref in reference]


@SLOW_ON_TPU  # 22 s on the TPU plugin
def test_preempted_requests_match_unpreempted(
    baseline, make_llm, smollm2_path, smollm2_llm_kwargs
):
    # 18 blocks hold 288 tokens: enough for any one request (<= 224), far from the ~530
    # the batch needs, so running requests must be preempted and recomputed.
    config = hf_config(smollm2_path)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    bytes_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    kv_bytes = 18 * BLOCK_SIZE * bytes_per_token

    kwargs = {**smollm2_llm_kwargs, "kv_cache_memory": kv_bytes, "max_model_len": 256}
    llm = make_llm(smollm2_path, block_size=BLOCK_SIZE, **kwargs)
    outputs = llm.generate(REFERENCE_PROMPTS, GREEDY, use_tqdm=False)
    assert llm.llm_engine.get_num_preemptions() > 0, "the small cache should force preemption"
    assert _tokens(outputs) == baseline


def test_prompt_alone_matches_prompt_in_batch(baseline, smollm2_llm):
    for i in (0, 3, 8):
        [alone] = smollm2_llm.generate(REFERENCE_PROMPTS[i], GREEDY, use_tqdm=False)
        assert list(alone.outputs[0].token_ids) == baseline[i], f"prompt {i}"
    reordered = smollm2_llm.generate(REFERENCE_PROMPTS[::-1], GREEDY, use_tqdm=False)
    assert _tokens(reordered) == baseline[::-1]


@SLOW_ON_TPU  # 36 s on the TPU plugin, 13 s on the CPU
def test_seeded_sampling_survives_preemption(make_llm, smollm2_path, smollm2_llm_kwargs):
    # A resumed request replays its seeded draws, so preemption does not change samples.
    config = hf_config(smollm2_path)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    bytes_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    sampled = [SamplingParams(temperature=1.0, top_p=0.95, seed=100 + i, max_tokens=24,
                              ignore_eos=True)
               for i in range(len(REFERENCE_PROMPTS))]
    roomy = make_llm(smollm2_path, block_size=BLOCK_SIZE, **smollm2_llm_kwargs)
    expected = _tokens(roomy.generate(REFERENCE_PROMPTS, sampled, use_tqdm=False))
    roomy.llm_engine.shutdown()
    kwargs = {**smollm2_llm_kwargs, "kv_cache_memory": 18 * BLOCK_SIZE * bytes_per_token,
              "max_model_len": 256}
    tight = make_llm(smollm2_path, block_size=BLOCK_SIZE, **kwargs)
    got = _tokens(tight.generate(REFERENCE_PROMPTS, sampled, use_tqdm=False))
    assert tight.llm_engine.get_num_preemptions() > 0, "the small cache should force preemption"
    assert got == expected
