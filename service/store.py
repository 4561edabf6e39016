"""Reads of a stored dataset that several gateway services share: its metadata, and its item ids in
upload order, a page at a time (the async twins of grape.selection_io's sync reads)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from redis.asyncio import Redis

from grape.keys import Keys, is_dataset_id
from grape.redis_client import as_str
from grape.selection_io import PAGE
from service.errors import NotFound, shown


async def read_meta(redis: Redis, keys: Keys, dataset_id: str) -> dict[str, str] | None:
    """The dataset's metadata hash as text, or None when there is no such dataset (or `dataset_id` is not
    an id at all: a value from a body, like a training job's dataset_id, must not name another key)."""
    if not is_dataset_id(dataset_id):
        return None
    raw = await redis.hgetall(keys.dataset(dataset_id))
    return {as_str(k): as_str(v) for k, v in raw.items()} if raw else None


async def dataset_meta(redis: Redis, keys: Keys, dataset_id: str) -> dict[str, str]:
    """The dataset's metadata; a 404 when there is no such dataset."""
    meta = await read_meta(redis, keys, dataset_id)
    if meta is None:
        raise NotFound(f"dataset {shown(dataset_id)} not found")
    return meta


async def id_pages(redis: Redis, keys: Keys, dataset_id: str) -> AsyncIterator[list[bytes]]:
    """The dataset's item ids in upload order, PAGE at a time."""
    start = 0
    while True:
        ids = await redis.lrange(keys.order(dataset_id), start, start + PAGE - 1)
        if not ids:
            return
        start += len(ids)
        yield ids
