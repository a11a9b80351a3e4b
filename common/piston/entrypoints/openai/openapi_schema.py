"""The OpenAPI schema tells the truth: every error status with its OpenAI error body, and
the server's own limits (the most n, stop strings, logprobs, prompts and tokens) written
into the request schemas, so a client generated from /openapi.json sends what is accepted.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from piston.entrypoints.openai.protocol import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad input: malformed JSON, a wrong type, a value out of range "
                                                 "or past a limit, a prompt too long for the context."},
    401: {"model": ErrorResponse, "description": "A missing or wrong API key."},
    403: {"model": ErrorResponse, "description": "A parameter the caller may not set (priority, with "
                                                 "--restrict-priority)."},
    404: {"model": ErrorResponse, "description": "A model (or LoRA adapter) this server does not serve."},
    413: {"model": ErrorResponse, "description": "The request body is larger than --max-request-body-bytes."},
    500: {"model": ErrorResponse, "description": "This request failed inside the engine; other requests and the "
                                                 "server are unaffected."},
    503: {"model": ErrorResponse, "description": "At capacity (retry after Retry-After seconds), or the engine "
                                                 "is dead or wedged.",
          "headers": {"Retry-After": {"description": "Seconds to wait before retrying, when at capacity.",
                                      "schema": {"type": "integer"}}}},
}


# With stream=true: server-sent events, each one a chunk as JSON (the response's shape, or
# OpenAI's error shape if the request fails mid-stream), and finally the data "[DONE]".
STREAM_RESPONSE: dict[str, Any] = {
    "description": "The completion; with stream=true, its chunks as server-sent events.",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "A chunk as JSON, or [DONE] at the end."},
                       "event": {"type": "string"}}}}},
}


def _each_alternative(prop: dict, patch: Callable[[dict], None]) -> None:
    """Apply ``patch`` to the property's schema, or to each non-null alternative of a union."""
    alternatives = prop.get("anyOf") or prop.get("oneOf")
    if alternatives is None:
        patch(prop)
        return
    for alt in alternatives:
        if alt.get("type") != "null":
            patch(alt)


def _set(key: str, value: Any, types: tuple[str, ...] | None = None) -> Callable[[dict], None]:
    def patch(schema: dict) -> None:
        if types is None or schema.get("type") in types:
            schema[key] = value
    return patch


def _limit_request(props: dict, config, engine_config) -> None:
    mc = engine_config.model_config
    max_new = max(mc.max_model_len - 1, 1)
    vocab_max = mc.vocab_size - 1

    def patch(name: str, fn: Callable[[dict], None]) -> None:
        if name in props:
            _each_alternative(props[name], fn)

    patch("n", _set("maximum", config.max_n))
    for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
        patch(name, _set("maximum", max_new))
    for name in ("logprobs", "top_logprobs"):
        patch(name, _set("maximum", mc.max_logprobs if mc.max_logprobs >= 0 else mc.vocab_size, ("integer",)))

    def stop(schema: dict) -> None:
        if schema.get("type") == "array":
            schema["maxItems"] = config.max_stop_sequences

    patch("stop", stop)

    def stop_ids(schema: dict) -> None:
        if schema.get("type") == "array":
            schema["maxItems"] = config.max_stop_token_ids
            schema["items"]["maximum"] = vocab_max

    patch("stop_token_ids", stop_ids)

    def prompt(schema: dict) -> None:
        if schema.get("type") != "array":
            return
        items = schema["items"]
        if items.get("type") == "integer":  # one prompt of token ids
            schema["maxItems"] = max_new
            items["maximum"] = vocab_max
        elif items.get("type") == "array":  # several prompts of token ids
            schema["maxItems"] = config.max_prompts_per_request
            items["maxItems"] = max_new
            items["items"]["maximum"] = vocab_max
        else:  # several prompt strings
            schema["maxItems"] = config.max_prompts_per_request

    patch("prompt", prompt)


def document_limits(app: FastAPI, config, engine_config) -> None:
    """Replace ``app.openapi`` with a schema that carries the server's limits, documents 400
    (not FastAPI's 422) for invalid input, and names the bearer scheme when keys are set."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            if name in components:
                _limit_request(components[name]["properties"], config, engine_config)
        # Invalid input is answered 400 in OpenAI's error shape, never FastAPI's 422.
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        if not config.api_keys:  # an open server has no security to declare
            schema.get("components", {}).pop("securitySchemes", None)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.pop("security", None)
                    operation.get("responses", {}).pop("401", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
