"""Heartbeats: who is alive. Each process (worker, trainer, evaluator) publishes a JSON key with a TTL, and,
where its kind keeps one, its name in a zset by last beat.

Readers take the zset's recent members and MGET their keys: no SCAN over a shared keyspace. A key that
expired is a dead process, whatever the zset still says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from grape.keys import Keys
from grape.redis_client import as_str

TTL_S = 30
"""Workers' heartbeat TTL (trainers and evaluators take theirs from settings)."""


@dataclass(frozen=True)
class Beats:
    """Where one kind of process publishes its heartbeats."""

    key: Callable[[str], str]  # name -> its heartbeat key
    index: str | None  # zset name -> time of its last beat (None: this kind keeps none)
    ttl: float

    def publish(self, client: Any, name: str, info: dict[str, Any]) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.set(self.key(name), orjson.dumps(info), ex=max(1, int(self.ttl)))
        if self.index is not None:
            pipe.zadd(self.index, {name: time.time()})
        pipe.execute()

    def remove(self, client: Any, name: str) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.delete(self.key(name))
        if self.index is not None:
            pipe.zrem(self.index, name)
        pipe.execute()

    async def live(self, redis: Any, window: float | None = None) -> list[dict[str, Any]]:
        """Heartbeats of the processes that beat in the last `window` seconds (default the TTL) and whose key
        has not expired (asyncio client). Names silent for ten windows are dropped from the index."""
        assert self.index is not None, "a kind without an index cannot be listed"
        window = self.ttl if window is None else window
        now = time.time()
        await redis.zremrangebyscore(self.index, "-inf", now - 10 * window)
        names = await redis.zrangebyscore(self.index, now - window, "+inf")
        if not names:
            return []
        raws = await redis.mget([self.key(as_str(n)) for n in names])
        return [orjson.loads(r) for r in raws if r]


def workers(keys: Keys) -> Beats:
    return Beats(keys.worker, keys.workers(), TTL_S)


def publish(client: Any, keys: Keys, name: str, info: dict[str, Any]) -> None:
    """A worker's heartbeat."""
    workers(keys).publish(client, name, info)


def remove(client: Any, keys: Keys, name: str) -> None:
    workers(keys).remove(client, name)


async def live(redis: Any, keys: Keys) -> list[dict[str, Any]]:
    """Heartbeats of the live workers."""
    return await workers(keys).live(redis)
