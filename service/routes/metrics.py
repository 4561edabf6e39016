"""GET /metrics: Prometheus text format, open like /healthz (no API key needed): fleet-wide counts without
tenant data; the per-dataset and per-worker series only for `may_see_detail`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from grape.settings import Settings
from grape.tenancy import Identity
from service import metrics as svc
from service.deps import KeysDep, RedisDep, SettingsDep

router = APIRouter(tags=["health"])


def may_see_detail(request: Request, settings: Settings) -> bool:
    """Whether a scrape gets dataset ids and worker names: the operator said so (GRAPE_METRICS_DETAIL), or the
    caller is an admin (an operator key of GRAPE_ADMIN_KEYS, or anyone on a gateway without keys, where every
    /v1 route is open to its callers anyway). A tenant's key does not: the series name every tenant's datasets."""
    if settings.metrics_detail:
        return True
    who = request.scope.get("state", {}).get("identity")  # set by ApiKeyMiddleware for a valid key
    return isinstance(who, Identity) and who.admin


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (queues, datasets, workers)")
async def metrics(request: Request, redis: RedisDep, keys: KeysDep, settings: SettingsDep) -> Response:
    body, content_type = await svc.render(
        redis=redis,
        keys=keys,
        accept=request.headers.get("accept"),
        detail=may_see_detail(request, settings),
        configured_models=settings.allowed_model_names(),
    )
    return Response(content=body, media_type=content_type)
