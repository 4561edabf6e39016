"""The gateway: validates, enqueues, reports. It never runs a model (and never imports torch)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOOM

from grape import __version__
from grape.keys import Keys
from grape.redis_client import connect, connect_async
from grape.settings import DEFAULT_REDIS_URL, Settings, get_settings
from grape.store.errors import Conflict, NotFound, OverQuota, StoreError
from grape.tenancy import quotas_of
from service.auth import ApiKeyMiddleware, KeyTable, LocalHostMiddleware
from service.deps import Slots, thread_connections
from service.errors import ApiError, Busy, SafeJSONResponse
from service.limits import BodyLimitMiddleware, FollowLimitMiddleware
from service.routes import datasets, health
from service.routes import evaluations as evaluation_routes
from service.routes import experiments as experiment_routes
from service.routes import metrics as metrics_routes
from service.routes import status as status_page
from service.routes import summary as summary_routes
from service.routes import training as training_routes
from service.routes import usage as usage_routes
from service.routes import workers as worker_routes
from service.tenancy import adopt_in_background


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = connect_async(
            settings.redis_url or DEFAULT_REDIS_URL,
            max_connections=settings.redis_max_connections,
            pool_timeout=settings.redis_pool_timeout_s,
        )
        # the worker threads' own client, for whole-pool reads (an export, a comparison: grape.store.io.thread_pages)
        app.state.redis_threads = connect(
            settings.redis_url or DEFAULT_REDIS_URL,
            max_connections=thread_connections(settings),
            pool_timeout=settings.redis_pool_timeout_s,
        )
        # records made before tenants become `default`'s (in the background: a start never waits on Redis)
        adopt = asyncio.create_task(adopt_in_background(app.state.redis, app.state.keys), name="tenancy-adopt")
        try:
            yield
        finally:
            adopt.cancel()
            with suppress(asyncio.CancelledError):
                await adopt
            await app.state.redis.aclose()
            app.state.redis_threads.close()

    app = FastAPI(
        title="grape-select",
        version=__version__,
        description="Score candidate SFT responses with the target model and select the ones that fit it.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keys = Keys(settings.key_prefix)
    app.state.upload_slots = Slots(settings.max_concurrent_uploads)
    app.state.quotas = quotas_of(settings)  # a bad GRAPE_TENANTS_FILE stops the gateway here, naming the fault

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
        return SafeJSONResponse({"detail": exc.message, **exc.extra}, status_code=exc.status, headers=headers)

    @app.exception_handler(StoreError)
    async def store_error(_: Request, exc: StoreError) -> JSONResponse:
        if isinstance(exc, OverQuota):
            return SafeJSONResponse({"detail": str(exc), **exc.body()}, status_code=403)
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 422
        return SafeJSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes every offending input: a large bad body would come back larger, and a
        # value that cannot be encoded would turn into a 500. Here: where and why, for the first few only.
        errors = exc.errors()
        shown = [_error(e) for e in errors[: settings.max_rejections]]
        return SafeJSONResponse({"detail": shown, "errors_total": len(errors)}, status_code=422)

    @app.exception_handler(RedisOOM)
    async def redis_full(_: Request, exc: RedisOOM) -> JSONResponse:
        # maxmemory + noeviction: Redis refuses writes instead of dropping data; nothing was half-written
        detail = "the queue store is full (Redis maxmemory); retry later, or add workers / memory"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "30"})

    @app.exception_handler(RedisConnectionError)
    async def redis_down(_: Request, exc: RedisConnectionError) -> JSONResponse:
        detail = "the queue store (Redis) is unreachable; retry later"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})

    # the last added runs first: Host check (local mode), API key, body limits, log-follow limit, routes
    app.add_middleware(FollowLimitMiddleware, limit=settings.max_log_followers, keyed=bool(settings.keys_list()))
    app.add_middleware(
        BodyLimitMiddleware, upload_limit=settings.max_body_bytes, request_limit=settings.max_request_bytes
    )
    app.add_middleware(ApiKeyMiddleware, table=KeyTable(settings.key_entries()))
    if not settings.keys_list():
        app.add_middleware(LocalHostMiddleware, allowed={settings.host, *settings.allowed_hosts_list()})

    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(summary_routes.router)
    app.include_router(training_routes.router)
    app.include_router(evaluation_routes.router)
    app.include_router(experiment_routes.router)  # its lifespan runs the experiment driver
    app.include_router(worker_routes.router)
    app.include_router(usage_routes.router)
    app.include_router(metrics_routes.router)
    app.include_router(status_page.router)
    app.mount("/static", status_page.static_files(), name="static")
    return app


def _error(err: Any) -> dict[str, Any]:
    """One validation error without the input it was about, its texts cut short."""
    loc = [p if isinstance(p, int) else str(p)[:100] for p in err.get("loc", ())]
    return {"loc": loc, "msg": str(err.get("msg", ""))[:500], "type": str(err.get("type", ""))}
