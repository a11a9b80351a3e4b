"""The OpenAI-compatible HTTP server: a FastAPI app around one AsyncLLM, run by uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from piston.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from piston.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                ModelCard, ModelList, OpenAIError)
from piston.entrypoints.openai.serving_chat import OpenAIServingChat
from piston.entrypoints.openai.serving_completion import OpenAIServingCompletion
from piston.entrypoints.openai.serving_engine import (engine_dead_error, is_engine_dead,
                                                      to_openai_error)
from piston.version import __version__

logger = logging.getLogger(__name__)

HEALTH_POLL_S = 1.0
_HEALTH_TIMEOUT_S = 5.0


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.to_response().model_dump(), status_code=err.status)


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
    """Poll the engine's health; once it is dead, mark the app and ask the server to exit."""
    engine = app.state.engine
    while not app.state.engine_dead:
        await asyncio.sleep(HEALTH_POLL_S)
        dead = engine.errored
        if not dead:
            try:
                await asyncio.wait_for(engine.check_health(), _HEALTH_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("The engine did not answer a health check in %.0f s.",
                               _HEALTH_TIMEOUT_S)
            except Exception as e:
                dead = is_engine_dead(e) or engine.errored
                if not dead:
                    logger.warning("Health check failed: %s", e)
        if dead:
            app.state.engine_dead = True
            logger.error("The engine died (%s); shutting the server down.", engine.dead_error)
            app.state.on_engine_dead()


def build_app(engine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``served_model_name``.

    With ``api_key`` every /v1 route requires ``Authorization: Bearer <api_key>``. The
    app watches the engine and calls ``app.state.on_engine_dead()`` once it dies.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.ensure_future(_watch_engine(app))
        try:
            yield
        finally:
            watcher.cancel()

    app = FastAPI(title="Piston OpenAI-compatible API", version=__version__, lifespan=lifespan)
    metrics = ServerMetrics(served_model_name)
    app.state.engine = engine
    app.state.engine_dead = False
    app.state.on_engine_dead = lambda: None
    app.state.metrics = metrics
    completion = OpenAIServingCompletion(engine, served_model_name, metrics, api_key)
    chat = OpenAIServingChat(engine, served_model_name, metrics, api_key)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(OpenAIError(message, status=400, param=param))

    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError):
        return error_response(exc)

    # A dependency, not an HTTP middleware: BaseHTTPMiddleware would hide client
    # disconnects from the handlers, which must abort abandoned requests.
    async def check_api_key(request: Request) -> None:
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise OpenAIError("Invalid or missing API key; send 'Authorization: Bearer <key>'.",
                                  status=401, type="authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.post("/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request):
        try:
            return await completion.create_completion(request, raw_request)
        except Exception as e:
            return error_response(to_openai_error(e))

    @v1.post("/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        try:
            return await chat.create_chat_completion(request, raw_request)
        except Exception as e:
            return error_response(to_openai_error(e))

    @v1.get("/models")
    async def list_models():
        mc = engine.config.model_config
        return ModelList(data=[ModelCard(id=served_model_name, root=mc.model,
                                         max_model_len=mc.max_model_len)])

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if app.state.engine_dead or engine.errored:
            return error_response(engine_dead_error(engine.dead_error))
        try:
            await asyncio.wait_for(engine.check_health(), _HEALTH_TIMEOUT_S)
        except Exception as e:
            return error_response(engine_dead_error(e))
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def get_metrics():
        return Response(await metrics.render(engine), media_type=CONTENT_TYPE)

    return app


async def serve(args: argparse.Namespace) -> int:
    """Load the engine, serve until stopped; 1 if the engine died, else 0."""
    import uvicorn

    from piston.engine.arg_utils import EngineArgs
    from piston.engine.async_llm import AsyncLLM
    from piston.model_resolver import DEFAULT_MODEL_NAME

    engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args))
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    app = build_app(engine, name, args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=3, timeout_keep_alive=5)
    server = uvicorn.Server(config)

    def on_engine_dead() -> None:
        server.should_exit = True

    app.state.on_engine_dead = on_engine_dead

    async def announce() -> None:
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        if server.started:
            logger.info("Piston is serving %s at http://%s:%d/v1", name, args.host, args.port)

    announcer = asyncio.ensure_future(announce())
    try:
        await server.serve()
    finally:
        announcer.cancel()
        engine.shutdown()
    return 1 if app.state.engine_dead else 0


def run_server(args: argparse.Namespace) -> int:
    """Run ``piston serve``; returns the process exit status."""
    return asyncio.run(serve(args))
