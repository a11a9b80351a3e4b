"""Greedy decoding matches Hugging Face transformers token for token, in float32.

Every prompt of a batch is compared exactly with transformers running that prompt
alone. The references are guarded by `assert_no_near_ties`, so a mismatch here is an
engine bug (positions, masks, RoPE, weights), not float32 rounding.
"""

from __future__ import annotations

import pytest
from hf_reference import (
    LONG_PROMPT,
    REFERENCE_PROMPTS,
    SHORT_ANSWER_QUESTION,
    assert_no_near_ties,
    hf_greedy,
)

from piston import SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
TINY_MODELS = ["llama", "llama-tied", "llama3-rope-scaling", "qwen2", "qwen3"]
EOS = 2  # <|im_end|>, the SmolLM2 tokenizer's EOS (also the tiny models')


def _chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def _assert_matches(outputs, prompts, prompt_ids, reference) -> None:
    assert len(outputs) == len(prompts)
    for i, (out, prompt, ids, ref) in enumerate(zip(outputs, prompts, prompt_ids, reference)):
        assert out.prompt_token_ids == ids, f"prompt {i} tokenized differently"
        if isinstance(prompt, str):
            assert out.prompt == prompt
        completion = out.outputs[0]
        assert completion.token_ids == ref.token_ids, f"prompt {i}: {prompt!r:.60}"
        assert out.finished
        if ref.token_ids[-1] == EOS and len(ref.token_ids) < MAX_TOKENS:
            assert (completion.finish_reason, completion.stop_reason) == ("stop", None)
        else:
            assert completion.finish_reason == "length"


def test_smollm2_batch_of_mixed_lengths_matches_hf(smollm2_llm, smollm2_path, smollm2_tokenizer):
    # 1 to 200 prompt tokens in one call, plus a chat prompt whose answer ends in EOS.
    prompts = REFERENCE_PROMPTS + [_chat_prompt(smollm2_tokenizer, SHORT_ANSWER_QUESTION)]
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in prompts]
    reference = hf_greedy(smollm2_path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference)
    assert reference[-1].token_ids[-1] == EOS, "the chat prompt should end in EOS"

    outputs = smollm2_llm.generate(prompts, GREEDY, use_tqdm=False)
    _assert_matches(outputs, prompts, prompt_ids, reference)


def test_smollm2_token_id_prompts_match_hf(smollm2_llm, smollm2_path, smollm2_tokenizer):
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in REFERENCE_PROMPTS]
    reference = hf_greedy(smollm2_path, prompt_ids, MAX_TOKENS)

    outputs = smollm2_llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    _assert_matches(outputs, prompt_ids, prompt_ids, reference)

    # A single flat list of ids is one prompt, not a batch of one-token prompts.
    single = smollm2_llm.generate(prompt_ids[0], GREEDY, use_tqdm=False)
    _assert_matches(single, [prompt_ids[0]], prompt_ids[:1], reference[:1])


def test_smollm2_text_matches_hf_decoded_continuation(smollm2_llm, smollm2_path, smollm2_tokenizer):
    """What `piston generate "Once upon a time" --max-tokens 20 --temperature 0` prints."""
    prompt = "Once upon a time"
    [reference] = hf_greedy(smollm2_path, [smollm2_tokenizer(prompt).input_ids], 20)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    [out] = smollm2_llm.generate(prompt, params, use_tqdm=False)
    assert out.outputs[0].text == smollm2_tokenizer.decode(reference.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_greedy_matches_hf(name, tiny_models, make_llm, smollm2_tokenizer):
    path = tiny_models(name)
    # LONG_PROMPT (600 tokens) runs past the rope-scaling model's original context of 128.
    prompts = REFERENCE_PROMPTS + [LONG_PROMPT]
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in prompts]
    reference = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference)

    llm = make_llm(path, max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32")
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _assert_matches(outputs, prompts, prompt_ids, reference)
