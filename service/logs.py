"""One reader of a job-like log stream (training jobs, evaluations): its records as NDJSON, oldest first;
with `follow`, new ones as they come until the owner reaches a terminal state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import orjson
from redis.asyncio import Redis

from grape.jobs import decode_log

PAGE = 500

Progress = Literal["ended", "reaped", "running"]
"""What the owner of a followed log is doing: `ended` (terminal, or gone: the stream ends after its last
records), `reaped` (its dead runner was just reaped: look again at once), `running` (wait for records)."""


async def stream_log(
    redis: Redis,
    log_key: str,
    *,
    follow: bool,
    after: str,
    poll_ms: int,
    progress: Callable[[], Awaitable[Progress]],
) -> AsyncIterator[bytes]:
    last = after
    while True:
        rows = await redis.xrange(log_key, min=f"({last}" if last != "0-0" else "-", max="+", count=PAGE)
        for entry_id, fields in rows:
            rec = decode_log(entry_id, fields)
            last = rec["id"]
            yield orjson.dumps(rec) + b"\n"
        if len(rows) == PAGE:
            continue
        if not follow:
            return
        state = await progress()
        if state == "ended":
            for entry_id, fields in await redis.xrange(log_key, min=f"({last}", max="+"):
                yield orjson.dumps(decode_log(entry_id, fields)) + b"\n"
            return
        if state == "reaped":
            continue
        if not await redis.xread({log_key: last}, block=poll_ms, count=PAGE):
            await asyncio.sleep(0)
