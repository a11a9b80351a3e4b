"""Structured outputs: the grammar holds on every platform and with every grammar engine.

- Sampled at temperature 1 over many seeds, every output for a set of JSON schemas (nested
  objects, arrays, enums, bounded numbers, required fields), a regex, a choice list and an
  EBNF grammar parses and validates (``jsonschema``), and ends with "stop".
- Greedy constrained output on SmolLM2 equals transformers' greedy decoding with the same
  grammar engine masking its logits (tests/reference_impl.py), token for token. Every
  platform meets that one reference, so their outputs are identical; preemption changes
  nothing. (The two engines differ on purpose in one respect: where the grammar forces
  text, llguidance allows only its canonical tokens, xgrammar any tokenization of it.)
- A constraint that allows every token leaves the output as it is unconstrained.

Each test runs with every engine that imports here: xgrammar (which needs torch) and
llguidance (everywhere, so also in the torch-free TPU session).
"""

from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import pytest
from hf_reference import REFERENCE_PROMPTS, hf_config
from marks import SLOW_ON_TPU
from reference import reference

from piston import SamplingParams
from piston.step.sampling_params import StructuredOutputsParams

BACKENDS = ["guidance"] + (["xgrammar"] if importlib.util.find_spec("xgrammar")
                           and importlib.util.find_spec("torch") else [])
SEEDS = range(8)
BLOCK_SIZE = 16

SCHEMAS = {
    "nested-object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "array-of-objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"product": {"type": "string", "maxLength": 16},
                                   "quantity": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["product", "quantity"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
                       "in_stock": {"type": "boolean"}},
        "required": ["colour", "size", "in_stock"],
        "additionalProperties": False,
    },
    "bounded-numbers": {
        "type": "object",
        "properties": {"celsius": {"type": "integer", "minimum": -40, "maximum": 50},
                       "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
                       "wind": {"type": "number"}},
        "required": ["celsius", "humidity", "wind"],
        "additionalProperties": False,
    },
}
REGEX = r"[A-Z][a-z]{2,9} [0-9]{1,3}(, [A-Z][a-z]{2,9} [0-9]{1,3}){0,2}"
CHOICE = ["positive", "negative", "neutral"]
# llama.cpp's GBNF, which both engines read: a sum of one- or two-digit numbers in brackets.
GRAMMAR = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
GRAMMAR_RE = r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)"

QUESTIONS = {
    "nested-object": "Invent a person and give their name, age and address as JSON.",
    "array-of-objects": "Write a short shopping list as JSON.",
    "enums": "Describe a T-shirt in a shop as JSON.",
    "bounded-numbers": "Give today's weather in Paris as JSON.",
    "regex": "Name a few cities and their populations in thousands.",
    "choice": "Is the review 'I loved this film' positive, negative or neutral?",
    "grammar": "Write a sum of small numbers.",
}


def _constraints() -> dict[str, dict]:
    """name -> StructuredOutputsParams fields."""
    return {**{name: {"json": schema} for name, schema in SCHEMAS.items()},
            "regex": {"regex": REGEX}, "choice": {"choice": CHOICE}, "grammar": {"grammar": GRAMMAR}}


def _check(name: str, text: str) -> None:
    if name in SCHEMAS:
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    elif name == "regex":
        assert re.fullmatch(REGEX, text), text
    elif name == "choice":
        assert text in CHOICE
    else:
        assert re.fullmatch(GRAMMAR_RE, text), text


def _chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request, make_llm_module, smollm2_path, smollm2_llm_kwargs):
    """A SmolLM2 engine whose grammars come from the parametrized engine."""
    return make_llm_module(smollm2_path, structured_outputs_backend=request.param, **smollm2_llm_kwargs)


def test_sampled_outputs_always_validate(llm, smollm2_tokenizer):
    prompts, params, names = [], [], []
    for name, fields in _constraints().items():
        for seed in SEEDS:
            prompts.append(_chat(smollm2_tokenizer, QUESTIONS[name]))
            names.append(name)
            params.append(SamplingParams(temperature=1.0, seed=seed, max_tokens=200,
                                         structured_outputs=StructuredOutputsParams(**fields)))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for name, out in zip(names, outputs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        assert completion.token_ids[-1] == smollm2_tokenizer.eos_token_id  # the grammar ended on EOS
        _check(name, completion.text)
    # Temperature 1 really samples: the seeds do not all give one answer.
    assert len({out.outputs[0].text for name, out in zip(names, outputs) if name == "nested-object"}) > 1


GREEDY_CASES = ["nested-object", "enums", "regex", "choice", "grammar"]


@pytest.fixture(scope="module")
def greedy_reference(smollm2_path, smollm2_tokenizer):
    """engine -> case -> transformers greedy tokens under that engine, checked for near-ties."""
    constraints = _constraints()
    expected: dict[str, dict[str, list[int]]] = {}

    def get(engine: str) -> dict[str, list[int]]:
        if engine not in expected:
            expected[engine] = {}
            for name in GREEDY_CASES:
                prompt = smollm2_tokenizer(_chat(smollm2_tokenizer, QUESTIONS[name])).input_ids
                ids, gaps = reference().constrained_greedy(smollm2_path, prompt, 96, constraints[name], engine)
                assert gaps.min() > 1e-3, f"{name}: a near-tie on the reference path makes exact comparison unfair"
                expected[engine][name] = ids
        return expected[engine]

    return get


def _greedy_params(name: str, max_tokens: int = 96) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**_constraints()[name]))


def test_greedy_matches_transformers_with_the_same_engine(llm, greedy_reference, smollm2_tokenizer):
    expected = greedy_reference(llm.llm_engine.config.structured_outputs_config.backend)
    prompts = [_chat(smollm2_tokenizer, QUESTIONS[name]) for name in GREEDY_CASES]
    outputs = llm.generate(prompts, [_greedy_params(n) for n in GREEDY_CASES], use_tqdm=False)
    for name, out in zip(GREEDY_CASES, outputs):
        assert list(out.outputs[0].token_ids) == expected[name], name
        _check(name, out.outputs[0].text)


@SLOW_ON_TPU  # 20 s on the TPU plugin, 9 s on the CPU
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_with_preemption_matches_reference(backend, make_llm, greedy_reference, smollm2_path,
                                                  smollm2_llm_kwargs, smollm2_tokenizer):
    # 12 blocks hold 192 tokens: any one request fits, the cases three times over do not,
    # so running requests are preempted and recomputed, their matchers kept.
    config = hf_config(smollm2_path)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    bytes_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    kwargs = {**smollm2_llm_kwargs, "kv_cache_memory": 12 * BLOCK_SIZE * bytes_per_token, "max_model_len": 192}
    llm = make_llm(smollm2_path, block_size=BLOCK_SIZE, structured_outputs_backend=backend, **kwargs)
    cases = GREEDY_CASES * 3
    prompts = [_chat(smollm2_tokenizer, QUESTIONS[name]) for name in cases]
    outputs = llm.generate(prompts, [_greedy_params(n) for n in cases], use_tqdm=False)
    assert llm.llm_engine.get_num_preemptions() > 0, "the small cache should force preemption"
    for name, out in zip(cases, outputs):
        assert list(out.outputs[0].token_ids) == greedy_reference(backend)[name], name


def test_constraint_allowing_everything_changes_nothing(llm):
    free = {"regex": r"(.|\n)*"}
    for temperature in (0.0, 1.0):
        plain = [SamplingParams(temperature=temperature, seed=7, max_tokens=24) for _ in REFERENCE_PROMPTS]
        constrained = [SamplingParams(temperature=temperature, seed=7, max_tokens=24,
                                      structured_outputs=StructuredOutputsParams(**free)) for _ in REFERENCE_PROMPTS]
        # Constrained and unconstrained requests share the batch.
        outputs = llm.generate(REFERENCE_PROMPTS * 2, plain + constrained, use_tqdm=False)
        half = len(REFERENCE_PROMPTS)
        for a, b in zip(outputs[:half], outputs[half:]):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, a.prompt
            assert a.outputs[0].text == b.outputs[0].text


def test_constrained_request_reaching_max_tokens_ends_with_length(llm, smollm2_tokenizer):
    params = SamplingParams(temperature=0.0, max_tokens=5,
                            structured_outputs=StructuredOutputsParams(json=SCHEMAS["nested-object"]))
    [out] = llm.generate(_chat(smollm2_tokenizer, QUESTIONS["nested-object"]), params, use_tqdm=False)
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 5


def test_invalid_constraints_are_refused_before_the_engine(llm):
    bad = [({"json": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}, "json"),
           ({"regex": "([a-z]"}, "regex"),
           ({"grammar": "root ::= undefined_rule"}, "grammar")]
    for fields, named in bad:
        with pytest.raises(ValueError, match=named):
            llm.generate("Hi", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**fields)),
                         use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
