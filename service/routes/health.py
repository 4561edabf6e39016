from __future__ import annotations

from fastapi import APIRouter
from redis.exceptions import RedisError

from grape import __version__
from service.deps import RedisDep
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz(redis: RedisDep) -> Health:
    try:
        ok = bool(await redis.ping())
    except RedisError:
        ok = False
    return Health(status="ok", redis=ok, version=__version__)
