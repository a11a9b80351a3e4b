"""Structured outputs and tool calling through the OpenAI API, with the official client.

One SmolLM2 server with the Hermes tool template (examples/tool_chat_template_hermes.jinja),
since SmolLM2's own template does not show tools to the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import jsonschema
import pytest
from conftest import SMOLLM2_ARGS, ServerProcess, httpx
from pydantic import BaseModel, Field

TEMPLATE = str(Path(__file__).parents[2] / "examples" / "tool_chat_template_hermes.jinja")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def server(smollm2_path):
    proc = ServerProcess(smollm2_path, *SMOLLM2_ARGS, "--served-model-name", "smollm2", "--chat-template", TEMPLATE)
    yield proc.wait_ready()
    proc.stop()


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=40)
    landmarks: list[Annotated[str, Field(max_length=30)]] = Field(max_length=3)
    climate: Literal["temperate", "tropical", "arid", "polar"]


def test_parse_fills_a_pydantic_model(server):
    client = server.openai()
    completion = client.beta.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Describe Paris as JSON."}], response_format=City,
        max_tokens=200, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content) == choice.message.parsed


def test_response_format_json_schema_over_http(server):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "temperature": 0,
            "max_tokens": 50, "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "sum", "schema": schema, "strict": True}}}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)


@pytest.mark.parametrize("extra, check", [
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ({"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
    ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, lambda t: t in ("red", "green", "blue")),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"guided_regex": r"(cat|dog)s?"}, lambda t: re.fullmatch(r"(cat|dog)s?", t)),
    ({"guided_json": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
     lambda t: isinstance(json.loads(t)["n"], int)),
    ({"structured_outputs": {"grammar": 'root ::= "(" [0-9]+ ")"'}}, lambda t: re.fullmatch(r"\([0-9]+\)", t)),
])
def test_every_constraint_field_holds(server, extra, check):
    client = server.openai()
    for stream in (False, True):
        body = {k: v for k, v in extra.items() if k != "response_format"}
        kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "What colour is the sky? Be brief."}],
                      max_tokens=100, temperature=0.5, seed=1, extra_body=body)
        if "response_format" in extra:
            kwargs["response_format"] = extra["response_format"]
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            text, finish = choice.message.content, choice.finish_reason
        assert finish == "stop" and check(text), (extra, text)


def test_completions_endpoint_takes_constraints_too(server):
    out = server.openai().completions.create(model="smollm2", prompt="My phone number is", max_tokens=20,
                                              extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", out.choices[0].text) and out.choices[0].finish_reason == "stop"


def test_max_tokens_ends_a_constrained_request_with_length(server):
    out = server.openai().chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=4, extra_body={"guided_json": WEATHER["function"]["parameters"]})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4


def test_a_grammar_dead_end_is_a_400_naming_the_constraint(server):
    # xgrammar's regex allows no byte of U+9D711 (found by the fuzzer: this was a 500).
    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                   json={"model": "smollm2", "prompt": "Say:", "max_tokens": 10, "temperature": 0,
                         "guided_regex": "ab\U0009d711"})
    if r.status_code == 200:  # llguidance spells it
        assert r.json()["choices"][0]["text"].startswith("ab")
    else:
        assert r.status_code == 400 and "allows no next token" in r.json()["error"]["message"], r.text
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("choice", [[""], ["yes"]])
def test_a_complete_grammar_outranks_min_tokens(server, choice):
    # The grammar allows only the stop token, which min_tokens bans: the request ends with
    # "stop" on the grammar's text (found by the fuzzer: this was a 500).
    client = server.openai()
    for kwargs in (dict(temperature=0), dict(temperature=1.0, seed=3)):
        out = client.completions.create(model="smollm2", prompt="Answer:", max_tokens=12, **kwargs,
                                        extra_body={"guided_choice": choice, "min_tokens": 8})
        assert (out.choices[0].text, out.choices[0].finish_reason) == (choice[0], "stop")


@pytest.mark.parametrize("body, named", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "json"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "regex"),
    ({"structured_outputs": {"grammar": "root ::= missing_rule"}}, "grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "one output constraint"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "no tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
])
def test_bad_constraints_are_400_naming_the_problem(server, body, named):
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=30,
                   json={"model": "smollm2", "messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert named in r.json()["error"]["message"], r.text
    # The server keeps serving.
    ok = server.openai().chat.completions.create(model="smollm2", messages=ASK, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def _weather(arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    return args


def test_tool_call_round_trip(server):
    client = server.openai()
    messages = list(ASK)
    first = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", temperature=0, max_tokens=120)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls[:1]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        _weather(call.function.arguments)
    # The caller runs the tool and sends the result back.
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18})})
    second = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER, TIME],
                                            temperature=0, max_tokens=40)
    answer = second.choices[0]
    assert answer.message.content and not answer.message.tool_calls
    assert answer.finish_reason in ("stop", "length")
    # The history (assistant tool_calls, the tool message) reached the template.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10


def test_named_tool_choice_streams_its_arguments(server):
    client = server.openai()
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                           temperature=0, max_tokens=60)
    [call] = whole.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and whole.choices[0].finish_reason == "tool_calls"
    args = _weather(call.function.arguments)

    chunks = list(client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice=named, temperature=0, max_tokens=60, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) > 1, "the arguments should arrive in pieces"
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas)) == args
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_auto_tool_choice_parses_hermes_calls_from_text(server):
    # The model is steered into the Hermes call format by a regex, so the parser (not a
    # tool constraint) must find the call, in the whole response and in the stream.
    regex = (r'<tool_call>\n\{"name": "get_weather", '
             r'"arguments": \{"city": "[A-Z][a-z]{2,10}", "unit": "celsius"\}\}\n</tool_call>')
    client = server.openai()
    kwargs = dict(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=60,
                  extra_body={"structured_outputs": {"regex": regex}})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and _weather(call.function.arguments)["unit"] == "celsius"

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [("get_weather", json.loads(call.function.arguments))]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tools_reach_the_template_unless_tool_choice_is_none(server):
    client = server.openai()

    def prompt_tokens(**kwargs) -> int:
        return client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=1, **kwargs).usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(tools=[WEATHER]) > plain + 40
    assert prompt_tokens(tools=[WEATHER], tool_choice="none") == plain
