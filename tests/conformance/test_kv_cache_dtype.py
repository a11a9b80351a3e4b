"""A 16-bit KV cache (``kv_cache_dtype="float16"`` / ``"bfloat16"``) under a float32 model.

The cache rounds each K and V value once, when it is written; attention reads the rounded
values back and computes in float32 as before. So the cache holds twice the tokens in the
same memory, and the log-probabilities move by that rounding's effect only.

Tolerance, per returned top-k entry of SmolLM2's teacher-forced prompt log-probabilities
against Hugging Face transformers in float32 (four prompts, up to 200 tokens): measured on
the CPU platform, the largest deviation is 8.4e-3 nats with float16 and 6.7e-2 with
bfloat16 (3e-5 with the float32 cache); the bounds below are three times that. A cache
that lost or misplaced a token, or read its values at the wrong width, moves them by whole
nats. (The tiny random-weight models are no use here: their attention is so peaked that
float16 rounding alone moves them by 0.25 nats.)
"""

from __future__ import annotations

import pytest
from hf_reference import REFERENCE_PROMPTS, TOP_K, hf_config, hf_prompt_logprobs
from marks import SLOW_ON_TPU
from piston import SamplingParams

ATOL = {"float16": 2.5e-2, "bfloat16": 0.2}
PROMPTS = [REFERENCE_PROMPTS[i] for i in (0, 6, 7, 8)]  # the prompts test_logprobs_match_hf uses


@pytest.mark.parametrize("kv_cache_dtype", ["float16", pytest.param("bfloat16", marks=SLOW_ON_TPU)])
def test_16bit_kv_cache_holds_twice_the_tokens_and_stays_close_to_hf(kv_cache_dtype, smollm2_path, make_llm,
                                                                      smollm2_tokenizer, smollm2_llm_kwargs):
    kwargs = {**smollm2_llm_kwargs, "kv_cache_memory": 64 * 2**20}
    llm = make_llm(smollm2_path, **kwargs, kv_cache_dtype=kv_cache_dtype, block_size=16)
    config = hf_config(smollm2_path)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    bytes_per_block = 2 * 16 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2
    assert llm.llm_engine.get_num_total_blocks() == kwargs["kv_cache_memory"] // bytes_per_block

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP_K)
    for i, out in enumerate(llm.generate(PROMPTS, params, use_tqdm=False)):
        ids = out.prompt_token_ids
        rows = hf_prompt_logprobs(smollm2_path, ids)
        for pos in range(1, len(ids)):
            entry = out.prompt_logprobs[pos]
            assert ids[pos] in entry and len(entry) >= TOP_K
            for tid, lp in entry.items():
                hf = float(rows[pos - 1][tid])
                assert abs(lp.logprob - hf) <= ATOL[kv_cache_dtype], (
                    f"prompt {i}, token {pos}: token {tid} logprob {lp.logprob:.4f}, HF {hf:.4f}")
