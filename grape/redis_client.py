"""Redis clients for every process, with the same retry policy: a Redis restart or a dropped
connection is retried with backoff for about five seconds instead of failing the request or the worker."""

from __future__ import annotations

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_RETRY_ON = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]


def _retry_kwargs(asynchronous: bool) -> dict:
    if asynchronous:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry
    return {
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=6),
        "retry_on_error": _RETRY_ON,
        "health_check_interval": 15,
        "socket_keepalive": True,
    }


def as_str(v: object) -> str:
    """A Redis reply (bytes, or already str with decode_responses) as text."""
    return v.decode() if isinstance(v, bytes) else str(v)


def connect(url: str, *, max_connections: int | None = None, pool_timeout: float = 5.0) -> redis.Redis:
    """With `max_connections` (the gateway's worker threads): a bounded pool, as `connect_async`'s, read 1 MB a
    socket read (its replies are pages of stored items, ~5 MB: 64 KB reads took the GIL back ~80 times a page
    while the other threads wanted it)."""
    if max_connections is None:
        return redis.Redis.from_url(url, **_retry_kwargs(False))
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, socket_read_size=2**20, **_retry_kwargs(False)
    )
    return redis.Redis.from_pool(pool)


def connect_async(url: str, *, max_connections: int | None = None, pool_timeout: float = 5.0) -> redis.asyncio.Redis:
    """With `max_connections` (the gateway): a bounded pool; a caller waits up to `pool_timeout` seconds for
    a free connection, then gets a ConnectionError (the gateway's 503), instead of opening one more."""
    if max_connections is None:
        return redis.asyncio.Redis.from_url(url, **_retry_kwargs(True))
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, **_retry_kwargs(True)
    )
    return redis.asyncio.Redis.from_pool(pool)
