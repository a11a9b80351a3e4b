"""The models a server serves: the base model and its LoRA adapters (vLLM's serving_models).

- ``--lora-modules name=path ...`` (or vLLM's JSON form ``'{"name": ..., "path": ...,
  "base_model_name": ...}'``) registers adapters at start-up, each checked by the engine
  (a bad one fails start-up naming the problem). They get ``lora_int_id`` 1, 2, ... in order;
  adapters loaded at run time continue the count and an id is never handed out twice, so the
  prefix cache (keyed by the id) never matches an unloaded adapter's blocks.
- ``model`` in a completion or chat request names the base model (its served name) or an
  adapter; any other name is a 404 listing what is served.
- ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``, as vLLM has them: only
  routed with ``--enable-lora`` and ``PISTON_ALLOW_RUNTIME_LORA_UPDATING=1`` (or ``true``);
  otherwise they do not exist (404), as vLLM's do not without VLLM_ALLOW_RUNTIME_LORA_UPDATING.
  Unloading takes effect at once for new requests (404); requests already running with the
  adapter finish with it, and the workers drop its weights after the last one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI

from piston.entrypoints.openai.openapi_schema import ERROR_RESPONSES
from piston.entrypoints.openai.protocol import (LoadLoRAAdapterRequest, LoRAAdapterResponse, ModelCard,
                                                OpenAIError, UnloadLoRAAdapterRequest)
from piston.entrypoints.openai.server_config import LoRAModulePath
from piston.step.lora_adapter import LoRAAdapterError
from piston.step.lora_request import LoRARequest

logger = logging.getLogger(__name__)

# Names listed in a 404 before "and N more".
_LISTED_NAMES = 16
# The most adapters a server holds at once (a run-time load beyond it is a 400: unload one).
MAX_ADAPTERS = 1024


@dataclass(frozen=True)
class _Adapter:
    request: LoRARequest
    base_model_name: str | None = None


def _names(names: list[str]) -> str:
    listed = ", ".join(f"`{n}`" for n in names[:_LISTED_NAMES])
    more = len(names) - _LISTED_NAMES
    return listed + (f" and {more} more" if more > 0 else "")


class OpenAIServingModels:
    """The served names: the base model's and every loaded adapter's, with their LoRARequests."""

    def __init__(self, engine: Any, served_model_name: str) -> None:
        self.engine = engine
        self.base_model_name = served_model_name
        # The model's path (or hub id) names the base model too, as it always has.
        self.base_names = {served_model_name, engine.config.model_config.model}
        self.lora_config = engine.config.lora_config
        self.adapters: dict[str, _Adapter] = {}
        self._next_id = 1
        self._lock: asyncio.Lock | None = None
        # lora_int_id -> requests generating with it now (what an unload leaves running).
        self.running: Counter[int] = Counter()

    @property
    def lora_enabled(self) -> bool:
        return self.lora_config is not None

    def _mutex(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # ----- requests ------------------------------------------------------------------------

    def resolve(self, model: str | None) -> LoRARequest | None:
        """The LoRARequest ``model`` names (None: the base model); 404 for any other name."""
        if model is None or model in self.base_names:
            return None
        adapter = self.adapters.get(model)
        if adapter is not None:
            return adapter.request
        served = f"`{self.base_model_name}`"
        if self.adapters:
            served += f" and the LoRA adapter{'s' if len(self.adapters) > 1 else ''} {_names(list(self.adapters))}"
        raise OpenAIError(f"The model `{model}` does not exist; this server serves {served}.", status=404,
                          type="NotFoundError", param="model", code="model_not_found")

    async def track(self, lora_request: LoRARequest, source: AsyncIterator) -> AsyncIterator:
        """``source``'s items, counting the request as running with its adapter meanwhile."""
        lora_id = lora_request.lora_int_id
        self.running[lora_id] += 1
        try:
            async for item in source:
                yield item
        finally:
            self.running[lora_id] -= 1
            if self.running[lora_id] <= 0:
                del self.running[lora_id]
            await source.aclose()

    def cards(self, max_model_len: int | None) -> list[ModelCard]:
        """/v1/models: the base model (its served name only), then each adapter with
        ``parent`` = the base model and ``root`` = the adapter's folder, as vLLM lists them."""
        cards = [ModelCard(id=self.base_model_name, root=self.base_model_name, max_model_len=max_model_len)]
        cards += [ModelCard(id=name, root=a.request.lora_path, parent=a.base_model_name or self.base_model_name,
                            max_model_len=max_model_len) for name, a in self.adapters.items()]
        return cards

    # ----- loading and unloading ---------------------------------------------------------

    async def register_static(self, modules: tuple[LoRAModulePath, ...]) -> None:
        """Load the ``--lora-modules`` adapters (ids 1, 2, ...); ValueError naming the first
        one that cannot be served."""
        if modules and not self.lora_enabled:
            raise ValueError(f"--lora-modules {' '.join(map(str, modules))}: LoRA is off; add --enable-lora.")
        for m in modules:
            try:
                await self.load(m.name, m.path, m.base_model_name)
            except OpenAIError as e:
                raise ValueError(f"--lora-modules {m}: {e.message}") from None

    async def load(self, name: str, path: str, base_model_name: str | None = None) -> _Adapter:
        """Check and load an adapter under the next id; OpenAIError 400 when the name is taken
        or the adapter cannot be served (the message names the problem)."""
        async with self._mutex():
            if name in self.base_names:
                raise OpenAIError(f"The LoRA adapter name `{name}` is the base model's; choose another.",
                                  param="lora_name")
            known = self.adapters.get(name)
            if known is not None:
                raise OpenAIError(f"The LoRA adapter `{name}` has already been loaded (lora_int_id "
                                  f"{known.request.lora_int_id}, {known.request.lora_path}); unload it first.",
                                  param="lora_name")
            if len(self.adapters) >= MAX_ADAPTERS:
                raise OpenAIError(f"This server already serves {MAX_ADAPTERS} LoRA adapters, its limit; unload one "
                                  "before loading another.", param="lora_name")
            request = LoRARequest(name, self._next_id, os.path.abspath(path))
            self._next_id += 1  # never handed out again, whatever happens next
            try:
                await self.engine.add_lora(request)
            except LoRAAdapterError as e:  # checked before any worker saw it; the message names the problem
                raise OpenAIError(str(e), param="lora_path") from e
            except (ValueError, OSError) as e:  # an unreadable folder, say
                raise OpenAIError(f"LoRA adapter {name!r} cannot be loaded from {request.lora_path!r}: {e}",
                                  param="lora_path") from e
            except BaseException:
                # The workers may hold part of it: drop it (the id stays spent).
                try:
                    await self.engine.remove_lora(request.lora_int_id)
                except Exception:
                    pass
                raise
            adapter = _Adapter(request, base_model_name)
            self.adapters[name] = adapter
            logger.info("LoRA adapter %r loaded (lora_int_id %d) from %s.", name, request.lora_int_id,
                        request.lora_path)
            return adapter

    async def unload(self, name: str, lora_int_id: int | None = None) -> tuple[_Adapter, int]:
        """Stop serving an adapter: new requests naming it get 404 at once; those running
        with it finish with it. Returns it and how many requests still run with it; 404 for
        an adapter that is not loaded."""
        async with self._mutex():
            adapter = self.adapters.get(name)
            if adapter is None or (lora_int_id is not None and adapter.request.lora_int_id != lora_int_id):
                which = f"`{name}`" + (f" with lora_int_id {lora_int_id}" if lora_int_id is not None else "")
                loaded = f"loaded: {_names(list(self.adapters))}" if self.adapters else "none is loaded"
                raise OpenAIError(f"The LoRA adapter {which} cannot be found ({loaded}).", status=404,
                                  type="NotFoundError", param="lora_name", code="model_not_found")
            del self.adapters[name]
            lora_id = adapter.request.lora_int_id
            running = self.running.get(lora_id, 0)
            await self.engine.remove_lora(lora_id)
            logger.info("LoRA adapter %r (lora_int_id %d) unloaded%s.", name, lora_id,
                        f"; {running} running request(s) finish with it" if running else "")
            return adapter, running

    def describe(self) -> str:
        """The start-up log's LoRA line."""
        c = self.lora_config
        if c is None:
            return "LoRA adapters: off (--enable-lora turns them on)."
        adapters = ", ".join(f"{name} (lora_int_id {a.request.lora_int_id}, {a.request.lora_path})"
                             for name, a in self.adapters.items()) or "none yet"
        return (f"LoRA adapters: on (max_loras={c.max_loras}, max_lora_rank={c.max_lora_rank}, "
                f"max_cpu_loras={c.host_capacity}); serving {adapters}.")


def add_lora_routes(app: FastAPI, models: OpenAIServingModels, authenticate: Callable,
                    to_openai_error: Callable[[BaseException], OpenAIError]) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter, behind the API key
    (``to_openai_error``: serving_engine's, which imports this module)."""

    router = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], responses=ERROR_RESPONSES, tags=["lora"])

    @router.post("/load_lora_adapter", response_model=LoRAAdapterResponse)
    async def load_lora_adapter(request: LoadLoRAAdapterRequest):
        """Load a PEFT LoRA adapter under a new name; requests then name it in ``model``.
        400 if the name is taken or the adapter cannot be served."""
        try:
            adapter = await models.load(request.lora_name, request.lora_path)
        except Exception as e:  # the engine died, say: OpenAI's error shape all the same
            raise to_openai_error(e) from e
        r = adapter.request
        return LoRAAdapterResponse(status="loaded", lora_name=r.lora_name, lora_int_id=r.lora_int_id,
                                   lora_path=r.lora_path,
                                   message=f"Success: LoRA adapter '{r.lora_name}' added successfully.")

    @router.post("/unload_lora_adapter", response_model=LoRAAdapterResponse)
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest):
        """Stop serving an adapter: new requests naming it get 404 at once; requests already
        running with it finish with it (``running_requests``). 404 if it is not loaded."""
        try:
            adapter, running = await models.unload(request.lora_name, request.lora_int_id)
        except Exception as e:
            raise to_openai_error(e) from e
        r = adapter.request
        return LoRAAdapterResponse(status="unloaded", lora_name=r.lora_name, lora_int_id=r.lora_int_id,
                                   lora_path=r.lora_path, running_requests=running,
                                   message=f"Success: LoRA adapter '{r.lora_name}' removed successfully.")

    app.include_router(router)
