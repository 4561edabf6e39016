"""The gateway: validates, enqueues, reports. It never runs a model (and never imports torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOOM

from grape import __version__
from grape.keys import Keys
from grape.redis_client import connect_async
from grape.settings import DEFAULT_REDIS_URL, Settings, get_settings
from service.auth import ApiKeyMiddleware
from service.errors import ApiError, Busy
from service.routes import datasets, health
from service.routes import metrics as metrics_routes
from service.routes import status as status_page
from service.routes import summary as summary_routes
from service.routes import training as training_routes
from service.routes import workers as worker_routes


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = connect_async(settings.redis_url or DEFAULT_REDIS_URL)
        try:
            yield
        finally:
            await app.state.redis.aclose()

    app = FastAPI(
        title="grape-select",
        version=__version__,
        description="Score candidate SFT responses with the target model and select the ones that fit it.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keys = Keys(settings.key_prefix)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
        return JSONResponse({"detail": exc.message, **exc.extra}, status_code=exc.status, headers=headers)

    @app.exception_handler(RedisOOM)
    async def redis_full(_: Request, exc: RedisOOM) -> JSONResponse:
        # maxmemory + noeviction: Redis refuses writes instead of dropping data; nothing was half-written
        detail = "the queue store is full (Redis maxmemory); retry later, or add workers / memory"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "30"})

    @app.exception_handler(RedisConnectionError)
    async def redis_down(_: Request, exc: RedisConnectionError) -> JSONResponse:
        detail = "the queue store (Redis) is unreachable; retry later"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})

    app.add_middleware(ApiKeyMiddleware, keys=settings.keys_list())

    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(summary_routes.router)
    app.include_router(training_routes.router)
    app.include_router(worker_routes.router)
    app.include_router(metrics_routes.router)
    app.include_router(status_page.router)
    app.mount("/static", status_page.static_files(), name="static")
    return app
