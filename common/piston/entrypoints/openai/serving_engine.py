"""What both generation endpoints share: model checks, error mapping, SSE framing,
merging several requests' outputs, and aborting work when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request

from piston.engine.async_llm import EngineOverloadedError
from piston.engine.core_client import EngineDeadError
from piston.engine.output_processor import EngineRequestError
from piston.entrypoints.openai.metrics import ServerMetrics
from piston.entrypoints.openai.protocol import OpenAIError, PromptTokensDetails, SamplingFields, UsageInfo
from piston.entrypoints.openai.server_config import ServerConfig
from piston.entrypoints.openai.serving_models import OpenAIServingModels
from piston.outputs import RequestOutput
from piston.step.engine_messages import INVALID_REQUEST_ERROR
from piston.step.lora_request import LoRARequest
from piston.step.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = 1
_REQUEST_ID_RE = re.compile(r"[^A-Za-z0-9._:-]")


def engine_dead_error(e: BaseException | str | None = None, state: str = "dead") -> OpenAIError:
    detail = f": {str(e).rstrip('.')}" if e else ""
    if state == "dead":
        return OpenAIError(f"The inference engine is not running{detail}. The server is shutting "
                           "down; retry once it has restarted.", status=503,
                           type="service_unavailable_error")
    return OpenAIError(f"The inference engine is {state}{detail}.", status=503, type="service_unavailable_error")


def is_engine_dead(e: BaseException) -> bool:
    return isinstance(e, EngineDeadError)


def bad_request(e: Exception) -> OpenAIError:
    """A ValueError/TypeError from validation as a 400; names the parameter the text leads with."""
    message = str(e)
    first = message.split(" ", 1)[0].split("=", 1)[0]
    param = first if first in SamplingFields.model_fields or first in (
        "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "prompt",
        "messages") else None
    if "prompt" in message and "context" in message:
        param = param or "prompt"
    return OpenAIError(message, status=400, param=param)


def to_openai_error(e: BaseException) -> OpenAIError:
    """Map any exception raised while serving a request to the error the client sees."""
    if isinstance(e, OpenAIError):
        return e
    if is_engine_dead(e):
        return engine_dead_error(e)
    if isinstance(e, EngineOverloadedError):
        return OpenAIError(str(e), status=503, type="service_unavailable_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, EngineRequestError) and INVALID_REQUEST_ERROR in str(e):  # its parameters, found late
        return OpenAIError(str(e).replace(INVALID_REQUEST_ERROR, ""), status=400)
    if isinstance(e, EngineRequestError):  # this request alone failed; the cause is logged
        return OpenAIError(f"Internal server error: {e}", status=500, type="internal_server_error")
    if isinstance(e, (ValueError, TypeError)):
        return bad_request(e)
    logger.exception("Request failed", exc_info=e)
    return OpenAIError(f"Internal server error: {type(e).__name__}: {e}", status=500,
                       type="internal_server_error")


def sse(payload: Any) -> str:
    """One server-sent event holding a pydantic model or a JSON-able value."""
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    """State and helpers shared by the completion and chat handlers."""

    def __init__(self, engine, config: ServerConfig, metrics: ServerMetrics,
                 models: OpenAIServingModels | None = None) -> None:
        self.engine = engine
        self.config = config
        self.served_model_name = config.served_model_name
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.models = models if models is not None else OpenAIServingModels(engine, config.served_model_name)

    def check_request(self, request: SamplingFields, raw_request: Request, num_prompts: int = 1
                      ) -> LoRARequest | None:
        """The LoRA adapter ``model`` names (None: the base model). Raise 404 for a model this
        server does not serve, 503 if the engine is dead, 400 past a limit, 403 for a priority
        the caller may not set."""
        lora_request = self.models.resolve(request.model)
        if self.engine.errored:
            raise engine_dead_error(self.engine.dead_error)
        self._check_limits(request, num_prompts)
        if self.config.restrict_priority and request.priority < 0 and getattr(raw_request.state, "client_key",
                                                                              None) is None:
            raise OpenAIError(f"priority={request.priority} would run ahead of the default (0); only callers with "
                              "an API key may set it (--restrict-priority).", status=403,
                              type="permission_error", param="priority")
        return lora_request

    def response_model_name(self, lora_request: LoRARequest | None) -> str:
        """``model`` in a response: the adapter's name, else the base model's served name."""
        return lora_request.lora_name if lora_request is not None else self.served_model_name

    def _check_limits(self, request: SamplingFields, num_prompts: int) -> None:
        c = self.config

        def over(param: str, value: int, limit: int, flag: str) -> OpenAIError:
            return OpenAIError(f"{param}={value} exceeds this server's limit of {limit} ({flag}).", param=param)

        if request.n > c.max_n:
            raise over("n", request.n, c.max_n, "--max-n")
        if num_prompts > c.max_prompts_per_request:
            raise over("prompt", num_prompts, c.max_prompts_per_request, "--max-prompts-per-request; prompts")
        if num_prompts * request.n > c.max_prompts_per_request:
            raise OpenAIError(f"{num_prompts} prompts x n={request.n} = {num_prompts * request.n} completions "
                              f"exceed this server's limit of {c.max_prompts_per_request} per request "
                              "(--max-prompts-per-request).", param="n")
        stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        if len(stops) > c.max_stop_sequences:
            raise over("stop", len(stops), c.max_stop_sequences, "--max-stop-sequences; stop strings")
        if len(request.stop_token_ids or ()) > c.max_stop_token_ids:
            raise over("stop_token_ids", len(request.stop_token_ids), c.max_stop_token_ids,
                       "--max-stop-token-ids; ids")
        max_new = self.engine.config.model_config.max_model_len - 1
        for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
            value = getattr(request, name, None)
            if value is not None and value > max_new:
                raise OpenAIError(f"{name}={value} exceeds the model's context (max_model_len={max_new + 1} "
                                  "tokens, at least one of them prompt).", param=name)
        top = getattr(request, "top_logprobs", None)
        max_logprobs = self.engine.input_processor.max_logprobs
        if top is not None and top > max_logprobs:
            raise over("top_logprobs", top, max_logprobs, "--max-logprobs")

    def client_id(self, request: SamplingFields, raw_request: Request) -> str | None:
        """Who the fair policy shares by: the API key's holder when keys are in use (the
        client-chosen ``user`` field would let anyone claim many shares), else ``user``."""
        key = getattr(raw_request.state, "client_key", None)
        if self.config.api_keys:
            return self.config.client_of_key(key) if key else None
        return request.user

    @staticmethod
    def request_id(prefix: str, raw_request: Request) -> str:
        """A unique id that carries the client's X-Request-Id, when it sends one."""
        given = _REQUEST_ID_RE.sub("", raw_request.headers.get("x-request-id", ""))[:64]
        return f"{prefix}-{given}-{uuid.uuid4().hex[:16]}" if given else f"{prefix}-{uuid.uuid4().hex}"

    async def validate_prompts(self, prompts: list[str | list[int]], params: SamplingParams
                               ) -> list[tuple[str | None, list[int], SamplingParams]]:
        """Tokenize and check every prompt before any starts (400 on the first bad one)."""
        try:
            return [await self.engine.process_prompt(p, params) for p in prompts]
        except (ValueError, TypeError) as e:
            raise bad_request(e) from e

    def generate(self, token_ids: list[int], params: SamplingParams, request_id: str,
                 request: SamplingFields, raw_request: Request,
                 lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        received = getattr(raw_request.state, "received_time", None)
        client_id = self.client_id(request, raw_request)
        if lora_request is None:
            return self.engine.generate(token_ids, params, request_id, priority=request.priority,
                                        client_id=client_id, received_time=received)
        return self.models.track(lora_request, self.engine.generate(
            token_ids, params, request_id, priority=request.priority, client_id=client_id, received_time=received,
            lora_request=lora_request))

    def observe(self, out: RequestOutput, first_chunk_time: float | None = None) -> None:
        """Record a finished request in the metrics (with when its first streamed chunk
        went out, for a stream)."""
        if out.finished:
            if first_chunk_time is not None:
                out.metrics["first_chunk_time"] = first_chunk_time
            self.metrics.observe_finished(out)


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(max(o.num_cached_tokens, 0) for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


async def merge_async_iterators(*iterators: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    """Yield (iterator index, item) as items arrive from any iterator.

    Closing the merged iterator (or cancelling its consumer) cancels and closes every
    input iterator, so each engine request is aborted.
    """
    pending: dict[asyncio.Future, int] = {
        asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, item
                pending[asyncio.ensure_future(anext(iterators[i]))] = i
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for it in iterators:
            try:
                await it.aclose()
            except Exception:  # an already-failed generator has nothing to clean up
                pass


async def iterate_in_task(source: AsyncIterator[T]) -> AsyncIterator[T]:
    """Yield ``source``'s items, consuming it in a task of its own.

    Starlette cancels a streaming response through an anyio scope that cancels every
    later await too, which could interrupt the engine's abort on disconnect. Cancelling
    a plain task instead lets ``source`` clean up (abort its requests) undisturbed.
    """
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait((item, None))
            queue.put_nowait((end, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            queue.put_nowait((end, e))

    task = asyncio.ensure_future(pump())
    try:
        while True:
            item, error = await queue.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        task.cancel()


async def collect_until_disconnected(make: Callable[[], Awaitable[T]], raw_request: Request) -> T:
    """Run ``make()`` to completion unless the client disconnects first.

    On disconnect the work is cancelled (aborting its engine requests) and a 499-style
    OpenAIError is raised; nobody reads it, but the handler stops.
    """
    task = asyncio.ensure_future(make())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await raw_request.is_disconnected():
                raise OpenAIError("Client disconnected.", status=499)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
