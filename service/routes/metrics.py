"""GET /metrics: Prometheus text format, open like /healthz (no API key): counts and ids, no content."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service import metrics as svc
from service.deps import KeysDep, RedisDep

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (queues, datasets, workers)")
async def metrics(request: Request, redis: RedisDep, keys: KeysDep) -> Response:
    body, content_type = await svc.render(redis=redis, keys=keys, accept=request.headers.get("accept"))
    return Response(content=body, media_type=content_type)
