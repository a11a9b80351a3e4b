"""Tool calls: the constraint a required or named tool_choice puts on the output, and the
parsers that find calls in free text, whole and streamed."""

from __future__ import annotations

import json

import jsonschema
import pytest

from piston.entrypoints.openai.protocol import ChatCompletionRequest
from piston.entrypoints.openai.tool_calls import (HermesParser, Llama3JsonParser, ToolCallStream, _complete_items,
                                                  tool_constraint)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_named_tool_choice_constrains_to_that_functions_schema():
    request = _request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tool_constraint(request).json == WEATHER["function"]["parameters"]


def test_required_tool_choice_constrains_to_an_array_of_calls():
    schema = tool_constraint(_request(tools=[WEATHER, TIME], tool_choice="required")).json
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}},
                         {"name": "get_time", "parameters": {}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = tool_constraint(_request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)).json
    assert single["maxItems"] == 1


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_auto_and_none_do_not_constrain(choice):
    assert tool_constraint(_request(tools=[WEATHER], tool_choice=choice)) is None


def test_tool_choice_naming_a_missing_function_is_an_error():
    with pytest.raises(ValueError, match="'nope'.*get_weather"):
        tool_constraint(_request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}))
    with pytest.raises(ValueError, match="no tools"):
        tool_constraint(_request(tool_choice="required"))


def test_complete_items_of_a_cut_off_array():
    assert _complete_items('[{"a": 1}, {"b": [2, 3]}, {"c": "x') == [{"a": 1}, {"b": [2, 3]}]
    assert _complete_items("[") == [] and _complete_items("") == []


def _stream(parser_or_stream, text: str, pieces: int = 7):
    """Feed ``text`` in growing prefixes; collect content and calls as a client sees them."""
    content, calls = "", []
    cuts = sorted({len(text) * k // pieces for k in range(1, pieces)} | {len(text)})
    for cut in cuts:
        got, new = parser_or_stream.stream(text[:cut], cut == len(text)) if hasattr(parser_or_stream, "stream") \
            else parser_or_stream.update(text[:cut], cut == len(text))
        content += got or ""
        calls += new
    return content, calls


HERMES = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
          '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')


def test_hermes_finds_every_call_and_keeps_the_rest_as_content():
    content, calls = HermesParser().extract(HERMES)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_hermes_stream_holds_back_a_partial_tag_and_sends_calls_once():
    content, calls = _stream(HermesParser(), HERMES, pieces=23)
    assert content.strip() == "Let me check."
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]


def test_hermes_leaves_text_without_calls_alone():
    text = "No tools needed: <tool_call> is just a word here."
    assert HermesParser().extract(text) == (text, [])
    assert _stream(HermesParser(), "Plain answer, no calls.")[0] == "Plain answer, no calls."


def test_llama3_json_parses_one_or_several_calls():
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
            '{"name": "get_time", "parameters": {}}')
    content, calls = Llama3JsonParser().extract(text)
    assert content is None and [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Rome"}
    assert Llama3JsonParser().extract("The weather is fine.") == ("The weather is fine.", [])
    streamed_content, streamed = _stream(Llama3JsonParser(), text)
    assert streamed_content == "" and [c.function.name for c in streamed] == ["get_weather", "get_time"]
    assert _stream(Llama3JsonParser(), "Sunny, 20 degrees.")[0] == "Sunny, 20 degrees."


def test_named_call_streams_its_arguments_in_pieces():
    request = _request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    stream = ToolCallStream(request, constrained=True, parser="hermes")
    arguments = '{"city": "Lisbon"}'
    _, deltas = _stream(stream, arguments, pieces=5)
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == arguments
    assert stream.finish_reason("stop") == "tool_calls" and stream.finish_reason("length") == "length"


def test_required_calls_go_out_as_each_completes():
    request = _request(tools=[WEATHER, TIME], tool_choice="required")
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'
    content, deltas = _stream(ToolCallStream(request, constrained=True, parser="hermes"), text, pieces=11)
    assert content == "" and [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "get_time")]
    final = ToolCallStream(request, constrained=True, parser="hermes").final(text, "stop")
    assert final[0] is None and [c.function.name for c in final[1]] == ["get_weather", "get_time"]
    assert final[2] == "tool_calls"
