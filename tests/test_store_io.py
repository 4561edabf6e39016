"""The store's two drivers run one plan with the same result: a sync client (trainer, worker, evaluator) and
an asyncio client (the gateway), against the real Redis; a Lua call loads its script when Redis lacks it."""

from __future__ import annotations

import asyncio
import uuid

import redis
import redis.asyncio

from grape.keys import Keys
from grape.store import io


def _plan(keys: Keys) -> io.Plan[tuple[int, list[str]]]:
    # two round trips; the second depends on the first's replies, as a real read's does
    n, first = yield [io.cmd("llen", f"{keys.prefix}:l"), io.cmd("lindex", f"{keys.prefix}:l", 0)]
    (rest,) = yield [io.cmd("lrange", f"{keys.prefix}:l", 1, n)]
    return n, [first.decode(), *(x.decode() for x in rest)]


def _page(keys: Keys, size: int):
    def page(start: int) -> io.Plan[io.Page[str]]:
        (rows,) = yield [io.cmd("lrange", f"{keys.prefix}:l", start, start + size - 1)]
        return [r.decode() for r in rows], (start + size if len(rows) == size else None)

    return page


def test_one_plan_two_drivers_same_answer(rclient: redis.Redis, redis_url: str, keys: Keys) -> None:
    rclient.rpush(f"{keys.prefix}:l", *[f"v{i}" for i in range(7)])
    sync = io.run(rclient, _plan(keys))
    sync_pages = list(io.pages(rclient, _page(keys, 3)))

    async def both() -> tuple[object, object, object]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            plain = await io.arun(client, _plan(keys))
            offloaded = await io.arun(client, _plan(keys), offload=True)
            paged = [p async for p in io.apages(client, _page(keys, 3), offload=True)]
            threaded = [p async for p in io.thread_pages(rclient, _page(keys, 3))]
            return plain, offloaded, paged, threaded
        finally:
            await client.aclose()

    plain, offloaded, paged, threaded = asyncio.run(both())
    assert sync == (7, [f"v{i}" for i in range(7)])
    assert plain == sync and offloaded == sync
    assert sync_pages == [["v0", "v1", "v2"], ["v3", "v4", "v5"], ["v6"]] == paged == threaded


def test_thread_pages_read_one_page_ahead_one_at_a_time(rclient: redis.Redis, keys: Keys) -> None:
    """Pages come in order from a page function that keeps state (as a selection's does); the next page is read
    while the caller holds this one, never two at once; a caller that stops early leaves no page read after it."""
    rclient.rpush(f"{keys.prefix}:l", *[f"v{i}" for i in range(10)])
    read = _page(keys, 2)
    started: list[int] = []
    running = [0]
    most = [0]

    def page(start: int) -> io.Plan[io.Page[str]]:
        started.append(start)
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            return (yield from read(start))
        finally:
            running[0] -= 1

    async def first_two() -> list[list[str]]:
        got = []
        async for rows in io.thread_pages(rclient, page):
            await asyncio.sleep(0.2)  # the caller is slow: the next page is read meanwhile
            got.append(rows)
            if len(got) == 2:
                break
        await asyncio.sleep(0.3)
        return got

    assert asyncio.run(first_two()) == [["v0", "v1"], ["v2", "v3"]]
    assert started == [0, 2, 4] and most[0] == 1  # one page ahead of the caller, then nothing more


def test_a_lua_call_loads_an_unknown_script_once(rclient: redis.Redis, redis_url: str, keys: Keys) -> None:
    # a source no one has loaded: the first EVALSHA meets NOSCRIPT and the call loads it
    script = io.Lua(f"-- {uuid.uuid4().hex}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert rclient.script_exists(script.sha) == [False]
    key = f"{keys.prefix}:n"
    assert io.call(rclient, script.call([key], [2])) == 2
    assert rclient.script_exists(script.sha) == [True]

    async def again() -> int:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await io.acall(client, script.call([key], [3]))
        finally:
            await client.aclose()

    assert asyncio.run(again()) == 5
