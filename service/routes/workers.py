"""GET /v1/workers: the live scoring workers and what each one runs (backend, path, dtype, progress)."""

from __future__ import annotations

from fastapi import APIRouter

from grape.store import heartbeats
from service.deps import KeysDep, RedisDep
from service.schemas import WorkerList, WorkerPublic

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("", response_model=WorkerList)
async def list_workers(redis: RedisDep, keys: KeysDep) -> WorkerList:
    """Workers whose heartbeat is fresh, by model, task and name."""
    beats = await heartbeats.live(redis, keys)
    workers = [WorkerPublic.model_validate(b) for b in beats if b.get("name") and b.get("model")]
    return WorkerList(workers=sorted(workers, key=lambda w: (w.model, w.task, w.name)))
