"""The vLLM-compatible sampling API: seeds, n, stops, lengths, chat, text, bad input."""

from __future__ import annotations

import pytest
from hf_reference import SHORT_ANSWER_QUESTION, hf_greedy
from marks import SLOW_ON_TPU

from piston import SamplingParams

EOS = 2
STORY = "Once upon a time"  # greedy: ", the city of Nova Haven was a thriving ..."
OPEN_PROMPT = "My favorite thing about summer is"


def _run(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def _tokens(outputs) -> list[list[int]]:
    return [list(c.token_ids) for out in outputs for c in out.outputs]


@SLOW_ON_TPU  # 19 s on the TPU plugin
def test_seeded_sampling_is_reproducible_across_calls(smollm2_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    assert _tokens(_run(smollm2_llm, OPEN_PROMPT, params)) == _tokens(
        _run(smollm2_llm, OPEN_PROMPT, params)
    )
    by_seed = {
        tuple(_tokens(_run(smollm2_llm, OPEN_PROMPT, params.clone(seed=s)))[0]) for s in range(3)
    }
    assert len(by_seed) > 1, "different seeds should give different samples"


def test_seeded_sampling_is_independent_of_batch_composition(smollm2_llm):
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=99, max_tokens=16)
    [alone] = _run(smollm2_llm, OPEN_PROMPT, seeded)
    neighbours = [SamplingParams(temperature=1.0, max_tokens=20), SamplingParams(temperature=0.0)]
    batch = _run(smollm2_llm, [STORY, OPEN_PROMPT, "Hi"], [neighbours[0], seeded, neighbours[1]])
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_n_returns_indexed_distinct_completions(smollm2_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8)
    [out] = _run(smollm2_llm, OPEN_PROMPT, params)
    assert sorted(c.index for c in out.outputs) == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_string_truncates_text(smollm2_llm):
    params = SamplingParams(temperature=0.0, max_tokens=20, stop=["Nova"])
    completion = _run(smollm2_llm, STORY, params)[0].outputs[0]
    assert completion.text == ", the city of "
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "Nova")

    kept = _run(smollm2_llm, STORY, params.clone(include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == ", the city of Nova"


def test_stop_token_id_ends_generation_after_that_token(smollm2_llm, smollm2_path, smollm2_tokenizer):
    [ref] = hf_greedy(smollm2_path, [smollm2_tokenizer(STORY).input_ids], 24)
    stop_id = ref.token_ids[3]  # " of", first seen at position 3
    assert stop_id not in ref.token_ids[:3]

    params = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_id])
    completion = _run(smollm2_llm, STORY, params)[0].outputs[0]
    assert completion.token_ids == ref.token_ids[:4]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_id)
    assert completion.text == ", the city"  # the stop token's text is not shown


def test_max_tokens_ends_with_finish_reason_length(smollm2_llm):
    completion = _run(smollm2_llm, STORY, SamplingParams(temperature=0.0, max_tokens=5))[0].outputs[0]
    assert len(completion.token_ids) == 5
    assert (completion.finish_reason, completion.stop_reason) == ("length", None)


def _ask(llm, params):
    return llm.chat([{"role": "user", "content": SHORT_ANSWER_QUESTION}], params)[0].outputs[0]


def test_eos_stops_unless_min_tokens_or_ignore_eos(smollm2_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    answer = _ask(smollm2_llm, greedy)  # "2 + 2 = 4" then EOS, 8 tokens
    assert answer.token_ids[-1] == EOS and len(answer.token_ids) == 8
    assert (answer.text, answer.finish_reason, answer.stop_reason) == ("2 + 2 = 4", "stop", None)

    held = _ask(smollm2_llm, greedy.clone(min_tokens=12))
    assert len(held.token_ids) == 12 and EOS not in held.token_ids
    assert held.token_ids[:7] == answer.token_ids[:7]
    assert held.finish_reason == "length"

    ignored = _ask(smollm2_llm, greedy.clone(ignore_eos=True))
    assert ignored.token_ids[:8] == answer.token_ids  # EOS is generated, then continued past
    assert len(ignored.token_ids) == 12 and ignored.finish_reason == "length"


def test_chat_applies_the_chat_template(smollm2_llm, smollm2_tokenizer):
    conversations = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
    ]
    outputs = smollm2_llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=8))
    assert len(outputs) == 2
    for out, conversation in zip(outputs, conversations):
        rendered = smollm2_tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        assert "<|im_start|>" in out.prompt and out.prompt.endswith("<|im_start|>assistant\n")
        assert out.prompt == rendered
        assert out.prompt_token_ids == smollm2_tokenizer(rendered).input_ids
    [single] = smollm2_llm.chat(conversations[0], SamplingParams(temperature=0.0, max_tokens=8))
    assert single.outputs[0].token_ids == outputs[0].outputs[0].token_ids


@pytest.mark.parametrize(
    "prompt, max_tokens",
    [("我最喜欢的食物是", 24), ("Here are some fruit emojis: 🍎🍌🍇", 15)],  # 15: 5 whole emojis
    ids=["chinese", "emoji"],
)
def test_multibyte_text_decodes_whole_characters(smollm2_llm, smollm2_tokenizer, prompt, max_tokens):
    [out] = _run(smollm2_llm, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    assert out.prompt == prompt
    text = out.outputs[0].text
    assert "\ufffd" not in text
    assert text == smollm2_tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "name, kwargs",
    [("max_tokens", dict(max_tokens=-1)), ("top_p", dict(top_p=0.0)), ("top_p", dict(top_p=1.5))],
)
def test_invalid_sampling_params_raise_naming_the_parameter(name, kwargs):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_invalid_prompts_raise_and_the_engine_keeps_working(smollm2_llm, smollm2_llm_kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match="(?i)prompt"):
        _run(smollm2_llm, "", params)
    with pytest.raises(ValueError, match="(?i)prompt"):
        _run(smollm2_llm, [STORY, ""], params)  # one bad request rejects the whole call

    max_len = smollm2_llm_kwargs["max_model_len"]
    with pytest.raises(ValueError) as too_long:
        _run(smollm2_llm, [[28] * (max_len + 1)], params)
    message = str(too_long.value)
    assert "prompt" in message.lower() and ("max_model_len" in message or str(max_len) in message)

    with pytest.raises(ValueError, match="49152"):  # the vocabulary has ids 0..49151
        _run(smollm2_llm, [[6403, 49152]], params)
    with pytest.raises(ValueError):
        _run(smollm2_llm, [STORY, "Hi"], [params])  # one SamplingParams per prompt, or one

    outputs = _run(smollm2_llm, [STORY, "Hi"], params)
    assert [out.prompt for out in outputs] == [STORY, "Hi"]
    assert outputs[0].outputs[0].text == ", the city of"
