"""GET /metrics: Prometheus text format, open like /healthz (no API key needed): fleet-wide counts without
tenant data; the per-dataset and per-worker series only for `may_see_detail`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from grape.settings import Settings
from service import metrics as svc
from service.auth import key_ok
from service.deps import KeysDep, RedisDep, SettingsDep

router = APIRouter(tags=["health"])


def may_see_detail(authorization: str | None, settings: Settings) -> bool:
    """Whether a scrape gets dataset ids and worker names: the operator said so (GRAPE_METRICS_DETAIL), the
    gateway has no keys (every /v1 route is open to its callers anyway), or the scrape sends a valid key.
    With tenants, the last clause is where "admin keys only" goes: a tenant's key must not see the others'."""
    if settings.metrics_detail:
        return True
    keys = settings.keys_list()
    return not keys or key_ok(authorization, keys)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (queues, datasets, workers)")
async def metrics(request: Request, redis: RedisDep, keys: KeysDep, settings: SettingsDep) -> Response:
    body, content_type = await svc.render(
        redis=redis,
        keys=keys,
        accept=request.headers.get("accept"),
        detail=may_see_detail(request.headers.get("authorization"), settings),
        configured_models=settings.allowed_model_names(),
    )
    return Response(content=body, media_type=content_type)
