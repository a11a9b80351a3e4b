"""Tool calls in /v1/chat/completions: the constraint for required and named calls, and the
parsers that find calls in free text (tool_choice "auto").

- ``tool_choice="required"``: the output is a JSON array of calls, each ``{"name": ...,
  "parameters": {...}}`` with the parameters constrained by that function's JSON schema.
- a named function: the output is that function's arguments, constrained by its schema.
- ``"auto"``: the model writes what it likes; ``--tool-call-parser`` finds the calls:
  ``hermes`` (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks) or
  ``llama3_json`` (the whole output is ``{"name": ..., "parameters": {...}}``, several
  separated by ``;``, optionally after ``<|python_tag|>``).
- ``"none"``: no tools are shown to the model and nothing is parsed.

Calls come back as OpenAI ``tool_calls`` (ids ``call_<hex>``, arguments as JSON text) with
``finish_reason="tool_calls"``. A stream sends a named call's arguments as they are
written, as OpenAI does; other calls go out as one delta each, once complete.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from piston.entrypoints.openai.protocol import (ChatCompletionRequest, DeltaFunctionCall, DeltaToolCall,
                                                FunctionCall, ToolCall)
from piston.step.sampling_params import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json")
_ANY_OBJECT = {"type": "object"}


def new_call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=text))


def as_delta(index: int, call: ToolCall, arguments: str | None = None) -> DeltaToolCall:
    """The first (or only) delta of a call: its id, name and ``arguments`` (default: all)."""
    return DeltaToolCall(index=index, id=call.id, type="function", function=DeltaFunctionCall(
        name=call.function.name, arguments=call.function.arguments if arguments is None else arguments))


def tools_in_play(request: ChatCompletionRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


def _named(request: ChatCompletionRequest) -> str | None:
    choice = request.tool_choice
    return None if choice is None or isinstance(choice, str) else choice.function.name


def tool_constraint(request: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The output constraint a required or named tool call puts on the request (ValueError
    for a named function the request does not define)."""
    if not request.tools:
        if request.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice names a tool call, but the request has no tools.")
        return None
    tools = {t.function.name: t.function.parameters or _ANY_OBJECT for t in request.tools}
    name = _named(request)
    if name is not None:
        if name not in tools:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools "
                             f"({', '.join(tools)}).")
        return StructuredOutputsParams(json=tools[name])
    if request.tool_choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": fn}, "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for fn, schema in tools.items()]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not request.parallel_tool_calls:
            array["maxItems"] = 1
        return StructuredOutputsParams(json=array)
    return None


def _complete_items(text: str) -> list[Any]:
    """The complete elements of the JSON array that ``text`` begins (it may be cut off)."""
    decoder = json.JSONDecoder()
    pos = text.find("[")
    items: list[Any] = []
    if pos < 0:
        return items
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return items
        items.append(item)


class ToolCallParser:
    """Finds tool calls in free text; in a stream, holds back text that may be a call."""

    name = ""

    def __init__(self) -> None:
        self.sent = 0  # characters of the text already given out as content
        self.calls: list[ToolCall] = []

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content without the calls, the calls) of a finished output."""
        raise NotImplementedError

    def stream(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        """The content to send now and the calls completed since the last call, for the
        output so far."""
        raise NotImplementedError


class HermesParser(ToolCallParser):
    name = "hermes"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
    _OPEN = "<tool_call>"

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for body in self._BLOCK.findall(text):
            try:
                call = json.loads(body)
                calls.append(new_call(call["name"], call.get("arguments", call.get("parameters", {}))))
            except (ValueError, KeyError, TypeError):
                continue  # not a call after all: it stays in the content
        return calls

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls = self._calls(text)
        if not calls:
            return text, []
        content = self._BLOCK.sub("", text).strip()
        return content or None, calls

    def stream(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        # Content runs up to the first block; a partial "<tool_call>" at the end waits.
        first = text.find(self._OPEN)
        end = first if first != -1 else len(text)
        if first == -1 and not finished:
            for k in range(len(self._OPEN) - 1, 0, -1):
                if text.endswith(self._OPEN[:k]):
                    end = len(text) - k
                    break
        content, self.sent = text[self.sent:max(end, self.sent)], max(end, self.sent)
        complete = self._calls(text)
        new, self.calls = complete[len(self.calls):], complete
        return content, new


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    _TAG = "<|python_tag|>"

    def _body(self, text: str) -> str | None:
        body = text.strip()
        body = body[len(self._TAG):].lstrip() if body.startswith(self._TAG) else body
        return body if body.startswith("{") else None

    def _calls(self, body: str) -> list[ToolCall]:
        calls = []
        for part in (p for p in body.split(";") if p.strip()):
            call = json.loads(part)
            calls.append(new_call(call["name"], call.get("parameters", call.get("arguments", {}))))
        return calls

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if body is None:
            return text, []
        try:
            return None, self._calls(body)
        except (ValueError, KeyError, TypeError):
            return text, []

    def stream(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        stripped = text.lstrip()
        tag = self._TAG
        if stripped and not (stripped.startswith(("{", tag)) or tag.startswith(stripped)):
            content, self.sent = text[self.sent:], len(text)  # plain content, not a call
            return content, []
        if not finished:
            return "", []  # a call may be being written: wait for the whole output
        content, calls = self.extract(text)
        if calls:
            self.calls = calls
            return "", calls
        rest, self.sent = text[self.sent:], len(text)
        return rest, []


class ToolCallStream:
    """The tool calls of one choice, as its text grows: what to send as content, and the
    OpenAI tool-call deltas. A named call streams its arguments as they are written (the
    first delta carries the id and name); other calls go out whole once complete."""

    def __init__(self, request: ChatCompletionRequest, constrained: bool, parser: str) -> None:
        self.named = _named(request) if constrained else None
        self.required = constrained and self.named is None
        self.parser = None if constrained else make_parser(parser)
        self.calls: list[ToolCall] = []
        self._args_sent = 0

    def update(self, text: str, finished: bool) -> tuple[str | None, list[DeltaToolCall]]:
        if self.named is not None:
            if not text[self._args_sent:]:
                return None, []
            fragment, self._args_sent = text[self._args_sent:], len(text)
            if not self.calls:
                self.calls.append(new_call(self.named, ""))
                return None, [as_delta(0, self.calls[0], fragment)]
            return None, [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=fragment))]
        if self.required:
            found = _complete_items(text)
            new = [new_call(c["name"], c["parameters"]) for c in found[len(self.calls):]
                   if isinstance(c, dict) and "name" in c and "parameters" in c]
            content = None
        else:
            content, new = self.parser.stream(text, finished)
        deltas = [as_delta(len(self.calls) + k, call) for k, call in enumerate(new)]
        self.calls += new
        return content or None, deltas

    def finish_reason(self, reason: str | None) -> str | None:
        """"tool_calls" when the output ended (with "stop") on calls."""
        return "tool_calls" if self.calls and reason == "stop" else reason

    def final(self, text: str, reason: str | None) -> tuple[str | None, list[ToolCall], str | None]:
        """(content, calls, finish_reason) of a finished, unstreamed choice."""
        if self.named is not None:  # the arguments, cut short if max_tokens ended them
            self.calls = [new_call(self.named, text)]
            return None, self.calls, self.finish_reason(reason)
        if self.required:
            self.update(text, True)
            return (None if self.calls else text), self.calls, self.finish_reason(reason)
        content, self.calls = self.parser.extract(text)
        return content, self.calls, self.finish_reason(reason)


def make_parser(name: str) -> ToolCallParser:
    parsers = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}
    if name not in parsers:
        raise ValueError(f"tool call parser {name!r} is unknown; use one of {', '.join(parsers)}.")
    return parsers[name]()
