"""Worker heartbeats: a JSON key with a TTL per worker, and a zset of names by last beat.

Readers take the zset's recent members and MGET their keys: no SCAN over a shared keyspace.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from grape.keys import Keys

TTL_S = 30


def publish(client: Any, keys: Keys, name: str, info: dict[str, Any], ttl: int = TTL_S) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.worker(name), orjson.dumps(info), ex=ttl)
    pipe.zadd(keys.workers(), {name: time.time()})
    pipe.execute()


def remove(client: Any, keys: Keys, name: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.worker(name))
    pipe.zrem(keys.workers(), name)
    pipe.execute()


async def live(redis: Any, keys: Keys, ttl: int = TTL_S) -> list[dict[str, Any]]:
    """Heartbeats of the workers seen in the last `ttl` seconds (async client)."""
    now = time.time()
    await redis.zremrangebyscore(keys.workers(), "-inf", now - 10 * ttl)
    names = await redis.zrangebyscore(keys.workers(), now - ttl, "+inf")
    if not names:
        return []
    raws = await redis.mget([keys.worker(n.decode() if isinstance(n, bytes) else n) for n in names])
    return [orjson.loads(r) for r in raws if r]
