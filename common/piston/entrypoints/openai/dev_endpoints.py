"""The development endpoints (``piston serve --dev-mode``), as vLLM's dev mode has them:
sleep mode for RLHF loops that share the device with training, and a prefix-cache reset.

- ``POST /sleep?level=1|2``: level 1 drops the KV cache and moves the weights off the
  device; level 2 drops both. Requests already streaming wait and resume after the
  wake-up (they are computed again); new ones get 503 with Retry-After until it.
- ``POST /wake_up`` (``?tags=weights`` and/or ``?tags=kv_cache``; none: both).
- ``GET /is_sleeping``.
- ``POST /reset_prefix_cache``.

They sit behind the API key when one is set. Without ``--dev-mode`` they do not exist (404).
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, Query

from piston.entrypoints.openai.openapi_schema import ERROR_RESPONSES
from piston.entrypoints.openai.protocol import OpenAIError, OpenAIModel


class SleepState(OpenAIModel):
    is_sleeping: bool
    # What is still released ("weights", "kv_cache"); empty when awake.
    asleep: list[str] = []


def add_dev_routes(app: FastAPI, engine: Any, authenticate: Callable) -> None:
    router = APIRouter(dependencies=[Depends(authenticate)], responses=ERROR_RESPONSES, tags=["dev"])

    @router.post("/sleep", response_model=SleepState)
    async def sleep(level: Annotated[int, Query(ge=1, le=2, description="1: weights kept off the device; "
                                                                       "2: dropped")] = 1):
        if await engine.is_sleeping():
            raise OpenAIError("The engine is already asleep; POST /wake_up first.", status=409, type="conflict")
        await engine.sleep(level)
        return SleepState(is_sleeping=True, asleep=["kv_cache", "weights"])

    @router.post("/wake_up", response_model=SleepState)
    async def wake_up(tags: Annotated[list[Literal["weights", "kv_cache"]] | None, Query(
            description="what to wake: weights, kv_cache, or both (the default)")] = None):
        still = await engine.wake_up(list(dict.fromkeys(tags)) if tags else None)
        return SleepState(is_sleeping=bool(still), asleep=still)

    @router.get("/is_sleeping", response_model=SleepState)
    async def is_sleeping():
        return SleepState(is_sleeping=await engine.is_sleeping())

    @router.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict:
        return {"reset": await engine.reset_prefix_cache()}

    app.include_router(router)
