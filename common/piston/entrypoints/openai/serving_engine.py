"""What both generation endpoints share: model checks, error mapping, SSE framing,
merging several requests' outputs, and aborting work when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request

from piston.engine.core_client import EngineDeadError
from piston.entrypoints.openai.metrics import ServerMetrics
from piston.entrypoints.openai.protocol import OpenAIError, SamplingFields, UsageInfo
from piston.outputs import RequestOutput
from piston.step.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DISCONNECT_POLL_S = 0.5


def engine_dead_error(e: BaseException | None = None) -> OpenAIError:
    detail = f": {str(e).rstrip('.')}" if e else ""
    return OpenAIError(f"The inference engine is not running{detail}. The server is shutting "
                       "down; retry once it has restarted.", status=503,
                       type="service_unavailable_error")


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

    def __init__(self, engine, served_model_name: str, metrics: ServerMetrics,
                 api_key: str | None = None) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.metrics = metrics
        self.api_key = api_key
        self.tokenizer = engine.tokenizer
        self.accepted_names = {served_model_name, engine.config.model_config.model}

    def check_request(self, request: SamplingFields) -> None:
        """Raise 404 for a model this server does not serve, 503 if the engine is dead."""
        if request.model is not None and request.model not in self.accepted_names:
            raise OpenAIError(f"The model `{request.model}` does not exist; this server serves "
                              f"`{self.served_model_name}`.", status=404,
                              type="NotFoundError", param="model", code="model_not_found")
        if self.engine.errored:
            raise engine_dead_error(self.engine.dead_error)

    def client_id(self, request: SamplingFields) -> str | None:
        return request.user or self.api_key

    def validate_prompts(self, prompts: list[str | list[int]], params: SamplingParams
                         ) -> list[tuple[str | None, list[int], SamplingParams]]:
        """Tokenize and check every prompt before any starts (400 on the first bad one)."""
        try:
            return [self.engine.process_prompt(p, params) for p in prompts]
        except (ValueError, TypeError) as e:
            raise bad_request(e) from e

    def generate(self, token_ids: list[int], params: SamplingParams, request_id: str,
                 request: SamplingFields) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(token_ids, params, request_id, priority=request.priority,
                                    client_id=self.client_id(request))

    def observe(self, out: RequestOutput) -> None:
        """Record a finished request in the metrics."""
        if out.finished:
            self.metrics.observe_finished(out)


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


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
