"""One reader of a queued record's log stream (training jobs, evaluations: grape.store.jobqueue): its records
as NDJSON, oldest first; with `follow`, new ones as they come until the record reaches a terminal state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import Query
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis

from grape.keys import Keys
from grape.store import logs
from grape.store.io import arun
from grape.store.jobqueue import TERMINAL, JobQueue
from service.errors import Conflict, NotFound

PAGE = 500

LOG_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/x-ndjson": {}},
        "description": 'One record per line: {"id", "t", "level", "msg", "data"?}.',
    }
}
"""The OpenAPI answer of a `.../logs` route."""

After = Annotated[str, Query(pattern=r"^\d{1,19}-\d{1,19}$", description="Only records after this record id.")]
"""A `.../logs` route's `after` parameter."""


def ndjson(lines: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(lines, media_type="application/x-ndjson")


async def record_log(
    redis: Redis,
    keys: Keys,
    queue: JobQueue,
    item_id: str,
    load: Callable[[], Awaitable[dict[str, Any]]],
    *,
    follow: bool,
    after: str = "0-0",
    poll_ms: int = 1000,
) -> AsyncIterator[bytes]:
    """The log of the record `load` reads (it raises NotFound first, before a line is sent). While followed,
    a record whose holder died is reaped on the way; one deleted (or unreadable) meanwhile ends the stream."""
    await load()
    log_key = queue.space(keys).log(item_id)
    last = after
    while True:
        recs = await arun(redis, logs.page(log_key, last, PAGE))
        for rec in recs:
            last = rec["id"]
            yield orjson.dumps(rec) + b"\n"
        if len(recs) == PAGE:
            continue
        if not follow:
            return
        try:
            record = await load()
        except (NotFound, Conflict):
            record = None
        if record is None or record["state"] in TERMINAL:
            for rec in await arun(redis, logs.page(log_key, last)):
                yield orjson.dumps(rec) + b"\n"
            return
        if await queue.areap_if_dead(redis, keys, record):
            continue  # its holder was dead: look again at once
        if not await arun(redis, logs.wait(log_key, last, poll_ms)):
            await asyncio.sleep(0)
