"""The FastAPI application: routes of both APIs, operations endpoints, error handling, start-up.

Design decisions:
- Every exception ends in one of the handlers here: `APIError` and foveal's typed errors become
  4xx JSON naming the problem; FastAPI's validation errors become 400 (not 422) with the field
  named; an unknown route is a JSON 404; anything unexpected is a bare 500 with no detail.
- Middleware order, outermost first: Guard (Host allow-list, auth, body limit, access log,
  metrics), then CORS only when origins are configured.
- `create_app` takes a registry, so tests (and `serve`) can hand over models already loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import FovealError
from .common import ServerState
from .config import ServerConfig
from .errors import APIError, BodyTooLarge, as_api_error, describe_validation, error_response
from .metrics import Metrics
from .models import ClientDisconnected, ModelRegistry
from .security import Guard

log = logging.getLogger("foveal.server")
REAP_INTERVAL_S = 5.0


def create_app(config: ServerConfig | None = None, registry: ModelRegistry | None = None,
               metrics: Metrics | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = metrics or (registry.metrics if registry is not None else Metrics())
    registry = registry or ModelRegistry(config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def reaper():
            while True:
                await asyncio.sleep(REAP_INTERVAL_S)
                try:
                    await registry.reap()
                except Exception:   # noqa: BLE001 - the reaper must survive one bad unload
                    log.exception("unloading an expired model failed")
        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="foveal", version=__version__, lifespan=lifespan,
                  description="Ollama-native (/api/*) and OpenAI-compatible (/v1/*) API for vision-language "
                              "models", docs_url=None, redoc_url=None)
    app.state.foveal = ServerState(config, registry, metrics, time.time())

    def _fail(request: Request, err: APIError):
        metrics.inc("foveal_errors_total", kind=err.kind)
        if err.status >= 500 and err.status != 503:
            log.error("%s %s -> %d", request.method, request.url.path, err.status)
        return error_response(err, request.url.path)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _fail(request, e)

    @app.exception_handler(FovealError)
    async def _foveal_error(request: Request, e: FovealError):
        return _fail(request, as_api_error(e))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, e: BodyTooLarge):
        return _fail(request, as_api_error(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return _fail(request, APIError(400, describe_validation(e.errors()), "invalid_request_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if request.scope.get("foveal", {}).get("too_large"):      # FastAPI wraps BodyTooLarge in a 400
            err = APIError(413, f"request body is over the limit of {config.max_body_bytes} bytes", "body_too_large")
        elif e.status_code == 404:
            err = APIError(404, f"no such endpoint: {request.method} {request.url.path[:100]}", "not_found")
        elif e.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path[:100]}",
                           "method_not_allowed")
        else:
            err = APIError(e.status_code, str(e.detail)[:200], "http_error")
        return _fail(request, err)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected):
        metrics.inc("foveal_errors_total", kind="client_disconnected")
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return _fail(request, as_api_error(e))

    @app.get("/health")
    async def health():
        entries = registry.entries.values()
        return {"status": "ok", "version": __version__, "uptime_s": round(time.time() - app.state.foveal.started_at, 3),
                "models": [{"name": e.name, "loaded": e.vlm is not None, "queued": e.active} for e in entries],
                "ready": bool(registry.entries)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    from . import ollama, openai, upload, web
    app.include_router(web.router)
    app.include_router(ollama.router)
    app.include_router(openai.router)
    app.include_router(upload.router)

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, config=config, metrics=metrics)
    return app


def uvicorn_config(app, config: ServerConfig, **kwargs):
    import uvicorn
    from .protocol import FovealH11Protocol
    return uvicorn.Config(app, host=config.host, port=config.port, http=FovealH11Protocol,
                          h11_max_incomplete_event_size=config.max_header_bytes, log_config=None,
                          access_log=False, server_header=False, timeout_graceful_shutdown=5, **kwargs)


def serve(models: list, config: ServerConfig, load_kwargs: dict | None = None) -> None:
    """Load the models (the bundled one when none is named) and serve until interrupted."""
    import uvicorn
    from ..api import load
    config.check_bind()
    metrics = Metrics()
    registry = ModelRegistry(config, metrics, load_kwargs)
    for ref in models or [None]:
        vlm = load(ref, **(load_kwargs or {}))
        registry.add_loaded(vlm)
    app = create_app(config, registry, metrics)
    import sys
    print(f"foveal serving {', '.join(registry.entries)} on http://{config.host}:{config.port} "
          f"(Ollama API at /api, OpenAI API at /v1, chat page at /)", file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, config)).run()
