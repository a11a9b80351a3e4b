"""The OpenAI-compatible HTTP server: a FastAPI app around one AsyncLLM, run by uvicorn.

Hardened for many clients at once: a body-size limit before any parsing, an API key (one
of several) on /v1 and optionally /metrics, limits on every size a request controls
(ServerConfig), a bound on waiting requests (503 with Retry-After past it), and /health
answered from the engine's heartbeat, never from the busy loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from piston.entrypoints.openai.dev_endpoints import add_dev_routes
from piston.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from piston.entrypoints.openai.openapi_schema import ERROR_RESPONSES, STREAM_RESPONSE, document_limits
from piston.entrypoints.openai.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                                CompletionResponse, HealthResponse, ModelList,
                                                OpenAIError, VersionResponse)
from piston.entrypoints.openai.request_limits import BodySizeLimit
from piston.entrypoints.openai.request_timeline import RequestTimelineWriter
from piston.entrypoints.openai.server_config import RUNTIME_LORA_ENV, ServerConfig
from piston.entrypoints.openai.serving_chat import OpenAIServingChat
from piston.entrypoints.openai.serving_completion import OpenAIServingCompletion
from piston.entrypoints.openai.serving_engine import engine_dead_error, to_openai_error
from piston.entrypoints.openai.serving_models import OpenAIServingModels, add_lora_routes
from piston.version import __version__

logger = logging.getLogger(__name__)

HEALTH_POLL_S = 1.0
# After the engine dies the server answers 503 this long before it exits, so in-flight
# responses are flushed and health probes see why.
DEAD_ENGINE_EXIT_DELAY_S = 2.0
_bearer = HTTPBearer(auto_error=False, description="One of the server's API keys, when it has any.")


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.to_response().model_dump(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('msg')}.", None
    where = ".".join(loc) or "body"
    return f"Invalid value for {where}: {first.get('msg')}.", (loc[0] if loc else None)


async def _watch_engine(app: FastAPI) -> None:
    """Watch the engine's health; once it is dead, mark the app and ask the server to exit."""
    engine = app.state.engine
    while not app.state.engine_dead:
        await asyncio.sleep(HEALTH_POLL_S)
        health = engine.health()
        if health.state == "dead" or engine.errored:
            app.state.engine_dead = True
            logger.error("The engine died (%s); shutting the server down.", engine.dead_error or health.detail)
            await asyncio.sleep(DEAD_ENGINE_EXIT_DELAY_S)
            app.state.on_engine_dead()
        elif not health.healthy:
            logger.warning("The engine is %s: %s", health.state, health.detail)


def build_app(engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``config.served_model_name``.

    The app watches the engine and calls ``app.state.on_engine_dead()`` once it dies.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.ensure_future(_watch_engine(app))
        try:
            yield
        finally:
            watcher.cancel()
            if timeline is not None:
                timeline.close()

    app = FastAPI(title="Piston OpenAI-compatible API", version=__version__, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_body_bytes)
    name = config.served_model_name
    timeline = RequestTimelineWriter(config.request_timeline_file) if config.request_timeline_file else None
    metrics = ServerMetrics(name, timeline)
    app.state.engine = engine
    app.state.engine_dead = False
    app.state.on_engine_dead = lambda: None
    app.state.metrics = metrics
    # The base model and its LoRA adapters; serve() loads the --lora-modules ones before serving.
    models = OpenAIServingModels(engine, name)
    app.state.models = models
    completion = OpenAIServingCompletion(engine, config, metrics, models)
    chat = OpenAIServingChat(engine, config, metrics, models)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(OpenAIError(message, status=400, param=param))

    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        # Starlette's own errors (no such route, wrong method) in OpenAI's error shape too.
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_server_error"
        return error_response(OpenAIError(str(exc.detail), status=exc.status_code, type=kind, headers=exc.headers))

    # A dependency, not an HTTP middleware: BaseHTTPMiddleware would hide client
    # disconnects from the handlers, which must abort abandoned requests.
    async def authenticate(request: Request,
                           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        """Record which key the caller used (request.state.client_key); 401 without a valid one."""
        request.state.client_key = None
        if not config.api_keys:
            return
        given = credentials.credentials if credentials is not None else ""
        for key in config.api_keys:
            if hmac.compare_digest(given.encode(), key.encode()):
                request.state.client_key = key
                return
        raise OpenAIError("Invalid or missing API key; send 'Authorization: Bearer <key>'.",
                          status=401, type="authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], responses=ERROR_RESPONSES)

    @v1.post("/completions", response_model=CompletionResponse, responses={200: STREAM_RESPONSE})
    async def create_completion(request: CompletionRequest, raw_request: Request):
        raw_request.state.received_time = time.monotonic()
        try:
            return await completion.create_completion(request, raw_request)
        except Exception as e:
            return error_response(to_openai_error(e))

    @v1.post("/chat/completions", response_model=ChatCompletionResponse, responses={200: STREAM_RESPONSE})
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        raw_request.state.received_time = time.monotonic()
        try:
            return await chat.create_chat_completion(request, raw_request)
        except Exception as e:
            return error_response(to_openai_error(e))

    @v1.get("/models", response_model=ModelList)
    async def list_models():
        # The base model by its served name only (its file path is nobody's business), then
        # each LoRA adapter with parent (the base model) and root (its folder), as vLLM lists them.
        return ModelList(data=models.cards(engine.config.model_config.max_model_len))

    app.include_router(v1)
    if config.dev_mode:
        add_dev_routes(app, engine, authenticate)
    # As vLLM: the routes exist only when the flag allows them (and LoRA is on); otherwise 404.
    if config.allow_runtime_lora_updating and models.lora_enabled:
        add_lora_routes(app, models, authenticate, to_openai_error)

    @app.get("/health", response_model=HealthResponse, responses={503: ERROR_RESPONSES[503]})
    async def health():
        """200 while the engine is alive, busy or not; 503 once it is dead or wedged."""
        state = engine.health()
        if app.state.engine_dead or not state.healthy:
            return error_response(engine_dead_error(state.detail or engine.dead_error, state.state))
        return HealthResponse(engine=state.state, detail=state.detail)

    @app.get("/version", response_model=VersionResponse)
    async def version():
        return VersionResponse(version=__version__)

    metrics_auth = [Depends(authenticate)] if config.metrics_require_api_key else []

    @app.get("/metrics", dependencies=metrics_auth, response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "Prometheus metrics, in the text exposition format."},
                        **({401: ERROR_RESPONSES[401]} if config.metrics_require_api_key else {})})
    async def get_metrics():
        return Response(await metrics.render(engine), media_type=CONTENT_TYPE)

    document_limits(app, config, engine.config)
    return app


async def serve(args: argparse.Namespace) -> int:
    """Load the engine, serve until stopped; 1 if the engine died, else 0."""
    import uvicorn

    from piston.engine.arg_utils import EngineArgs
    from piston.engine.async_llm import AsyncLLM
    from piston.model_resolver import DEFAULT_MODEL_NAME

    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    config = ServerConfig.from_cli_args(args, name)
    if config.lora_modules and not getattr(args, "enable_lora", False):
        raise ValueError(f"--lora-modules {' '.join(map(str, config.lora_modules))}: LoRA is off; add --enable-lora.")
    engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args), config.max_waiting_requests)
    try:
        app = build_app(engine, config)
        # Each adapter is checked here: a bad one stops the start-up, naming the problem.
        await app.state.models.register_static(config.lora_modules)
    except BaseException:
        engine.shutdown()
        raise
    _log_lora(app.state.models, config)
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                    timeout_graceful_shutdown=3, timeout_keep_alive=5)
    server = uvicorn.Server(uvicorn_config)

    def on_engine_dead() -> None:
        server.should_exit = True

    app.state.on_engine_dead = on_engine_dead

    async def announce() -> None:
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        if server.started:
            adapters = list(app.state.models.adapters)
            logger.info("Piston is serving %s%s at http://%s:%d/v1", name,
                        f" and {len(adapters)} LoRA adapter(s) ({', '.join(adapters)})" if adapters else "",
                        args.host, args.port)

    announcer = asyncio.ensure_future(announce())
    try:
        await server.serve()
    finally:
        announcer.cancel()
        engine.shutdown()
    return 1 if app.state.engine_dead else 0


def _log_lora(models: OpenAIServingModels, config: ServerConfig) -> None:
    """The start-up log's LoRA lines: the settings, the adapters, the runtime endpoints."""
    if not models.lora_enabled:
        if config.allow_runtime_lora_updating:
            logger.warning("%s is set, but LoRA is off (--enable-lora): /v1/load_lora_adapter and "
                           "/v1/unload_lora_adapter are not served.", RUNTIME_LORA_ENV)
        return
    logger.info(models.describe())
    if config.allow_runtime_lora_updating:
        logger.warning("LoRA adapters may be loaded and unloaded at run time (%s): POST /v1/load_lora_adapter "
                       "makes the server read any folder it can; allow it only where clients are trusted.",
                       RUNTIME_LORA_ENV)
    else:
        logger.info("Loading LoRA adapters at run time is off (%s=1 serves POST /v1/load_lora_adapter and "
                    "/v1/unload_lora_adapter).", RUNTIME_LORA_ENV)


def run_server(args: argparse.Namespace) -> int:
    """Run ``piston serve``; returns the process exit status."""
    return asyncio.run(serve(args))
