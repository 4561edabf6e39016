"""The gateway: validates, enqueues, reports. It never runs a model (and never imports torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis

from grape import __version__
from grape.keys import Keys
from grape.settings import DEFAULT_REDIS_URL, Settings, get_settings
from service.errors import ApiError
from service.routes import datasets, health


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = Redis.from_url(settings.redis_url or DEFAULT_REDIS_URL)
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
        return JSONResponse({"detail": exc.message, **exc.extra}, status_code=exc.status)

    app.include_router(health.router)
    app.include_router(datasets.router)
    return app
