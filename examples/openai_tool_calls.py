"""A tool-call round trip with the openai client against `piston serve`:

    piston serve --chat-template examples/tool_chat_template_hermes.jinja --tool-call-parser hermes
    python examples/openai_tool_calls.py [BASE_URL]      # default http://127.0.0.1:8000/v1

required tool choice, the tool's answer sent back, then a named tool call streamed.
"""

import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1", api_key="none")
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, tools=tools,
                                   tool_choice="required", temperature=0, max_tokens=60)
msg = r.choices[0].message
print("finish_reason:", r.choices[0].finish_reason)
for c in msg.tool_calls:
    print("tool_call:", c.id, c.function.name, c.function.arguments)
args = json.loads(msg.tool_calls[0].function.arguments)
messages.append(msg.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": msg.tool_calls[0].id,
                 "content": json.dumps({"city": args["city"], "temperature": 18, "unit": args["unit"]})})
r2 = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, tools=tools,
                                    tool_choice="none", temperature=0, max_tokens=40)
print("answer:", r2.choices[0].message.content, "| finish_reason:", r2.choices[0].finish_reason)
print("streamed:")
for chunk in client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages[:1], tools=tools,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=0, max_tokens=60, stream=True):
    if chunk.choices and chunk.choices[0].delta.tool_calls:
        print("  ", chunk.choices[0].delta.tool_calls[0].model_dump(exclude_none=True))
    elif chunk.choices and chunk.choices[0].finish_reason:
        print("   finish_reason:", chunk.choices[0].finish_reason)
