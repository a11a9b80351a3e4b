"""Architectures Piston has no model of its own for run through the transformers fallback
(``model_impl`` auto picks it for them) and match transformers token for token, in float32.

The tiny models (tests/reference_impl.py: phi3, olmo2, granite, gpt-neox) each exercise
something Llama lacks; transformers' modelling code runs them, with Piston's paged
attention plugged in, so batching, prefix-cache hits and chunked prefill must not change a
token. The fallback forced onto the tiny Llama must give the native model's output.

The transformers fallback is torch code: on the TPU platform (JAX) the file is skipped.
"""

from __future__ import annotations

import pytest
from hf_reference import REFERENCE_PROMPTS, assert_no_near_ties, hf_greedy
from piston import SamplingParams

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)
ENGINE_KWARGS = dict(max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32")
ATOL = 1e-3  # nats, as tests/conformance/test_logprobs_match_hf.py
SHARED_PREFIX = REFERENCE_PROMPTS[8]  # 200 tokens: twelve full blocks of 16


@pytest.fixture(scope="module", autouse=True)
def _torch_platform():
    from piston.hal.registry import get_platform

    platform = get_platform(None)
    if platform.name == "tpu":
        pytest.skip("the transformers fallback is torch-only; the TPU platform runs Piston's own JAX models")


def _assert_matches_hf(outputs, path, prompt_ids) -> None:
    """Greedy tokens equal transformers' (each prompt run alone), and each chosen token's
    logprob is within ATOL of transformers' raw log-probability."""
    reference = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference)
    for i, (out, ids, ref) in enumerate(zip(outputs, prompt_ids, reference)):
        assert out.prompt_token_ids == ids
        completion = out.outputs[0]
        assert completion.token_ids == ref.token_ids, f"prompt {i}: greedy tokens differ from transformers"
        for pos, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            assert abs(entry[token].logprob - float(ref.full_logprobs[pos, token])) <= ATOL, f"prompt {i}, {pos}"


@pytest.mark.parametrize("name", ["phi3", "olmo2", "granite", "gpt-neox"])
def test_fallback_greedy_matches_hf(name, tiny_models, make_llm, smollm2_tokenizer):
    path = tiny_models(name)
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in REFERENCE_PROMPTS]
    llm = make_llm(path, **ENGINE_KWARGS)  # model_impl auto: none of them is Piston's own
    outputs = llm.generate(REFERENCE_PROMPTS, GREEDY, use_tqdm=False)
    _assert_matches_hf(outputs, path, prompt_ids)


def test_fallback_prefix_hits_and_chunked_prefill_in_a_mixed_batch_match_hf(tiny_models, make_llm,
                                                                           smollm2_tokenizer):
    path = tiny_models("phi3")
    # 48 tokens a step: the 200-token prompts are prefilled in chunks, beside other requests.
    llm = make_llm(path, max_num_batched_tokens=48, **ENGINE_KWARGS)
    llm.generate(SHARED_PREFIX + " Who is Alice?", GREEDY, use_tqdm=False)
    prompts = [SHARED_PREFIX + " What did Alice see?", "Hi", REFERENCE_PROMPTS[7],
               SHARED_PREFIX + " What colour were its eyes?", "The capital of France is"]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for i in (0, 3):  # the shared prefix's full blocks came from the cache
        assert 12 * 16 <= outputs[i].num_cached_tokens < len(outputs[i].prompt_token_ids)
    _assert_matches_hf(outputs, path, [smollm2_tokenizer(p).input_ids for p in prompts])


def test_model_impl_transformers_on_llama_equals_the_native_model(tiny_models, make_llm):
    path = tiny_models("llama")
    prompts = REFERENCE_PROMPTS[:6]
    native = make_llm(path, model_impl="piston", **ENGINE_KWARGS).generate(prompts, GREEDY, use_tqdm=False)
    fallback = make_llm(path, model_impl="transformers", **ENGINE_KWARGS).generate(prompts, GREEDY, use_tqdm=False)
    for a, b in zip(native, fallback):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids, a.prompt
        for token, la, lb in zip(a.outputs[0].token_ids, a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(la[token].logprob - lb[token].logprob) <= ATOL
