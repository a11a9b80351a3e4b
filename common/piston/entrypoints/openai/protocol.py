"""Pydantic models of the OpenAI API that Piston serves (requests, responses, chunks, errors).

Request models ignore fields they do not know, as OpenAI-compatible servers do. Besides
OpenAI's own fields they accept vLLM's extra sampling fields (top_k, min_p, ...). Every
constraint a request must meet that does not depend on the server's settings is stated
here, so the OpenAPI schema says it; the settings' limits (the most n, stop strings,
logprobs, tokens...) are written into the schema by ``openapi_schema.document_limits``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from piston.step.sampling_params import SamplingParams, StructuredOutputsParams


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" is a number without a fraction, 2.0 included.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds: int) -> Any:
    """An integer field with ``bounds`` (ge, le) that the schema states as minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


# Seeds and priorities: integers every JSON parser reads exactly (JavaScript's included).
JSON_SAFE_INT = 2**53 - 1
SafeInt = json_int(ge=-JSON_SAFE_INT, le=JSON_SAFE_INT)
NonEmptyText = Annotated[str, Field(min_length=1)]
TokenId = json_int(ge=0)
PositiveInt = json_int(ge=1)
NonNegativeInt = json_int(ge=0)


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class RequestModel(OpenAIModel):
    # Strict: a value of the wrong JSON type (0 for a boolean, "1" for a number) is an error,
    # as the schema says. JSON has no NaN or Infinity, but Python's parser reads them: refuse them.
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False, strict=True)


# ----- errors --------------------------------------------------------------------------


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class OpenAIError(Exception):
    """An error the server reports to the client as OpenAI error JSON with ``status``."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: int | str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type, param
        self.code = code if code is not None else status
        self.headers = headers

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type,
                                             param=self.param, code=self.code))


# ----- requests ------------------------------------------------------------------------


class StreamOptions(RequestModel):
    include_usage: bool = False


# Rules no JSON schema states (a comparison of fields, or what a grammar engine accepts);
# breaking one is a 400 naming the field.
_ONE_CONSTRAINT = ("At most one of response_format, structured_outputs and the guided_* fields; a schema, regex or "
                   "grammar must compile (at most 256 KiB).")


class JsonSchemaFormat(RequestModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(RequestModel):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, grammar
    (EBNF/GBNF or Lark) or json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: PositiveInt = 1
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: NonEmptyText | list[NonEmptyText] | None = None
    seed: SafeInt | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's extra body fields.
    top_k: json_int(ge=-1) | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: NonNegativeInt = Field(0, description="At most max_tokens.")
    # Lower runs first; negative values (ahead of the default) may be reserved to API keys.
    priority: SafeInt = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: list[TokenId] | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (give one of them).
    response_format: ResponseFormat | None = Field(None, description=_ONE_CONSTRAINT)
    structured_outputs: StructuredOutputsField | None = Field(None, description=_ONE_CONSTRAINT)
    guided_json: dict[str, Any] | str | None = Field(None, description=_ONE_CONSTRAINT)
    guided_regex: str | None = Field(None, description=_ONE_CONSTRAINT)
    guided_choice: list[str] | None = Field(None, min_length=1, description=_ONE_CONSTRAINT)
    guided_grammar: str | None = Field(None, description=_ONE_CONSTRAINT)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's output constraint, from whichever field gives it; ValueError when
        several do, or one is malformed."""
        given: dict[str, dict[str, Any]] = {}
        if self.response_format is not None and self.response_format.type != "text":
            fmt = self.response_format
            if fmt.type == "json_object":
                given["response_format"] = {"json_object": True}
            elif fmt.json_schema is None:
                raise ValueError("response_format of type json_schema needs a json_schema with a schema.")
            else:
                given["response_format"] = {"json": fmt.json_schema.schema_}
        if self.structured_outputs is not None:
            given["structured_outputs"] = {k: v for k, v in self.structured_outputs.model_dump(by_alias=True).items()
                                           if v is not None and v is not False}
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given[name] = {key: getattr(self, name)}
        if not given:
            return None
        if len(given) > 1:
            raise ValueError(f"structured_outputs: give one output constraint, got {', '.join(given)}.")
        return StructuredOutputsParams(**next(iter(given.values())))

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None,
                         structured: StructuredOutputsParams | None = None) -> SamplingParams:
        """SamplingParams for this request; raises ValueError naming a bad parameter."""
        fields: dict[str, Any] = dict(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            structured_outputs=structured if structured is not None else self.structured_outputs_params())
        # None means "OpenAI's default", which is SamplingParams' default too.
        fields = {k: v for k, v in fields.items() if v is not None}
        return SamplingParams(max_tokens=max_tokens, **fields)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: PositiveInt | None = 16
    logprobs: NonNegativeInt | None = None
    echo: bool = False

    def to_sampling_params(self) -> SamplingParams:
        prompt_lp = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_lp)


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one of them


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    # top_logprobs needs logprobs=true: said in the schema too, so clients know before sending.
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: NonNegativeInt | None = None
    add_generation_prompt: bool = True  # vLLM extra
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="A named function must be one of tools; required or a named function needs tools and "
                          "constrains the output itself, so no response_format or structured_outputs with it.")
    parallel_tool_calls: bool = True

    def to_sampling_params(self, tool_constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true.")
        if tool_constraint is not None and self.structured_outputs_params() is not None:
            raise ValueError("tool_choice: a required or named tool call constrains the output already; drop "
                             "response_format / structured_outputs.")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, structured=tool_constraint)


# ----- responses -----------------------------------------------------------------------


class PromptTokensDetails(OpenAIModel):
    # Prompt tokens whose KV came from the prefix cache (device or offload tier), not computed.
    cached_tokens: int = 0


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(OpenAIModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None


class ResponseMessage(OpenAIModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class DeltaFunctionCall(OpenAIModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(OpenAIModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChoice(OpenAIModel):
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "piston"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(OpenAIModel):
    """GET /health: 200 while the engine is alive (idle, or busy within its step deadline)."""

    status: Literal["ok"] = "ok"
    engine: Literal["idle", "busy"]
    detail: str = ""


class VersionResponse(OpenAIModel):
    version: str


# ----- LoRA adapters at run time (PISTON_ALLOW_RUNTIME_LORA_UPDATING) -----------------------

LoRAName = Annotated[str, Field(min_length=1, max_length=256, description="What requests call the adapter in "
                                                                          "`model`.")]


class LoadLoRAAdapterRequest(RequestModel):
    """POST /v1/load_lora_adapter (vLLM's)."""

    lora_name: LoRAName
    lora_path: str = Field(min_length=1, max_length=4096, description="The PEFT adapter's folder on the server "
                                                                      "(adapter_config.json and "
                                                                      "adapter_model.safetensors).")


class UnloadLoRAAdapterRequest(RequestModel):
    """POST /v1/unload_lora_adapter (vLLM's)."""

    lora_name: LoRAName
    lora_int_id: json_int(ge=1, le=JSON_SAFE_INT) | None = Field(
        None, description="When given, the adapter's id must be this one (404 otherwise).")


class LoRAAdapterResponse(OpenAIModel):
    object: Literal["lora_adapter"] = "lora_adapter"
    status: Literal["loaded", "unloaded"]
    lora_name: str
    lora_int_id: int
    lora_path: str
    # On unload: requests that were running with the adapter and finish with it.
    running_requests: int = 0
    message: str
