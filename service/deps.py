"""Dependencies, declared once as aliases so routes read as plain typed parameters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Annotated

import redis
from fastapi import Depends, Path, Request
from redis.asyncio import Redis

from grape.keys import Keys, is_dataset_id, is_job_id
from grape.settings import Settings
from service.errors import ApiError, Busy, NotFound, shown


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_redis_threads(request: Request) -> redis.Redis:
    return request.app.state.redis_threads


def thread_connections(settings: Settings) -> int:
    """Connections of the worker threads' pool (an export or a comparison holds one while it reads a page): a quarter
    of the event loop's, at least 2."""
    return max(2, settings.redis_max_connections // 4)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_keys(request: Request) -> Keys:
    return request.app.state.keys


class Slots:
    """At most `limit` holders per name at once, in this process (the event loop is single-threaded, so a
    plain counter is exact). Used for uploads being parsed and for followed log streams."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: Counter[str] = Counter()

    def try_acquire(self, name: str = "") -> bool:
        if self.held[name] >= self.limit:
            return False
        self.held[name] += 1
        return True

    def release(self, name: str = "") -> None:
        self.held[name] -= 1
        if self.held[name] <= 0:
            del self.held[name]

    @contextmanager
    def hold(self, name: str, refusal: ApiError) -> Iterator[None]:
        """Hold a slot for the block; `refusal` is raised when none is free."""
        if not self.try_acquire(name):
            raise refusal
        try:
            yield
        finally:
            self.release(name)


def upload_slot(request: Request, settings: Settings) -> AbstractContextManager[None]:
    """One of GRAPE_MAX_CONCURRENT_UPLOADS: a body being read and parsed costs memory a few times its size."""
    slots: Slots = request.app.state.upload_slots
    refusal = Busy(
        f"{slots.limit} uploads are being read on this gateway (GRAPE_MAX_CONCURRENT_UPLOADS); retry shortly",
        retry_after=1,
    )
    return slots.hold("", refusal)


def dataset_id_path(dataset_id: Annotated[str, Path(description="A dataset id: ds-<12 hex digits>.")]) -> str:
    """The `{dataset_id}` path segment, 404 unless it has the form the gateway gives ids (grape.keys)."""
    if not is_dataset_id(dataset_id):
        raise NotFound(f"dataset {shown(dataset_id)} not found (dataset ids look like ds-<12 hex digits>)")
    return dataset_id


def job_id_path(job_id: Annotated[str, Path(description="A training job id: job-<12 hex digits>.")]) -> str:
    """The `{job_id}` path segment, 404 unless it has the form the gateway gives ids (grape.keys)."""
    if not is_job_id(job_id):
        raise NotFound(f"training job {shown(job_id)} not found (job ids look like job-<12 hex digits>)")
    return job_id


RedisDep = Annotated[Redis, Depends(get_redis)]
RedisThreadsDep = Annotated[redis.Redis, Depends(get_redis_threads)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
KeysDep = Annotated[Keys, Depends(get_keys)]
# path parameters checked at the edge: a route takes `dataset_id: DatasetId` (or `job_id: JobId`)
DatasetId = Annotated[str, Depends(dataset_id_path)]
JobId = Annotated[str, Depends(job_id_path)]
