"""How the store talks to Redis: each read written once as a plan, two drivers; each Lua script with its call builder.

The choice (issue #13): the gateway is asyncio (`redis.asyncio`), the worker, trainer and evaluator are
synchronous (`redis.Redis`, in threads that vLLM and TRL leave them). A read is written once, as a *plan*:
a generator that yields the commands of one round trip (run as one pipeline) and receives their replies,
and returns its value. `run` drives a plan with a sync client, `arun` with an asyncio client. Neither
wrapper the issue offered fits as well: an async core would put an event loop thread into every trainer and
worker process, beside vLLM's engine processes and TRL's dataloaders; a sync core would send every gateway
read through a thread pool with a second connection pool and its own limits. A plan has no I/O of its own,
so both sides run the same code with the client they already have, and the event loop never blocks (`arun`
can run the decoding between round trips in a worker thread: `offload=True`).

A Lua script is a `Lua` object beside a function that builds its keys and arguments (a `Call`); `call` and
`acall` run it (EVALSHA, loading the script once when Redis does not know it).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
from redis.exceptions import NoScriptError

T = TypeVar("T")

Cmd = tuple[str, tuple[Any, ...], dict[str, Any]]
"""One Redis command of a round trip: the client method's name and its arguments."""

Plan = Generator[list[Cmd], list[Any], T]
"""A read: yields each round trip's commands, receives their replies in order, returns the value."""

Page = tuple[list[T], int | None]
"""One page of a paged read and where the next one starts (None: this was the last)."""


def cmd(name: str, *args: Any, **kwargs: Any) -> Cmd:
    return (name, args, kwargs)


def one(name: str, *args: Any, **kwargs: Any) -> Plan[Any]:
    """A plan of a single command (for the simple reads a store function composes with `yield from`)."""
    (reply,) = yield [cmd(name, *args, **kwargs)]
    return reply


def _queue(pipe: Any, cmds: list[Cmd]) -> None:
    for name, args, kwargs in cmds:
        getattr(pipe, name)(*args, **kwargs)


def run(client: Any, plan: Plan[T]) -> T:
    """Drive a plan with a synchronous client (`redis.Redis`)."""
    try:
        cmds = next(plan)
        while True:
            with client.pipeline(transaction=False) as pipe:
                _queue(pipe, cmds)
                replies = pipe.execute()
            cmds = plan.send(replies)
    except StopIteration as done:
        return done.value


async def arun(client: Any, plan: Plan[T], *, offload: bool = False) -> T:
    """Drive a plan with an asyncio client (`redis.asyncio.Redis`). `offload`: run the plan's own work between
    round trips (decoding a page of JSON, say) in a worker thread, so the event loop keeps answering."""

    def step(replies: list[Any]) -> tuple[bool, Any]:
        # the plan's end comes back as a value: a StopIteration cannot cross a thread's future
        try:
            return False, plan.send(replies)
        except StopIteration as done:
            return True, done.value

    try:
        cmds = next(plan)
    except StopIteration as done:
        return done.value
    while True:
        async with client.pipeline(transaction=False) as pipe:
            _queue(pipe, cmds)
            replies = await pipe.execute()
        finished, cmds = await anyio.to_thread.run_sync(step, replies) if offload else step(replies)
        if finished:
            return cmds


def pages(client: Any, page: Callable[[int], Plan[Page[T]]], start: int = 0) -> Iterator[list[T]]:
    """A paged read, page after page, with a sync client; empty pages are skipped."""
    nxt: int | None = start
    while nxt is not None:
        rows, nxt = run(client, page(nxt))
        if rows:
            yield rows


async def apages(
    client: Any, page: Callable[[int], Plan[Page[T]]], start: int = 0, *, offload: bool = False
) -> AsyncIterator[list[T]]:
    """A paged read, page after page, with an asyncio client; empty pages are skipped."""
    nxt: int | None = start
    while nxt is not None:
        rows, nxt = await arun(client, page(nxt), offload=offload)
        if rows:
            yield rows


async def thread_pages(client: Any, page: Callable[[int], Plan[Page[T]]], start: int = 0) -> AsyncIterator[list[T]]:
    """A paged read for an asyncio caller, each page's plan run whole in a worker thread with a synchronous client
    (`redis.Redis`), the next page read while the caller handles this one; empty pages are skipped. For the reads
    that move most bytes (an export): a blocking socket in the thread reads a page's replies with less CPU than the
    event loop's streams, and the event loop only sends. Pages are still read one after another, never two at
    once, so a page function may keep state between them; at most one page is held besides the caller's, and a
    caller that stops early leaves nothing running after the page in flight."""

    def read(at: int) -> asyncio.Future[Page[T]]:
        return asyncio.ensure_future(anyio.to_thread.run_sync(run, client, page(at)))

    task: asyncio.Future[Page[T]] | None = read(start)
    try:
        while task is not None:
            rows, after = await task
            task = None if after is None else read(after)
            if rows:
                yield rows
    finally:
        if task is not None:
            task.cancel()


# ---- Lua scripts ---------------------------------------------------------------------------------------


class Lua:
    """A Lua script, known by its SHA1; calls to it are built by the function beside it (`Lua.call`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def call(self, keys: list[str], args: list[Any]) -> Call:
        return Call(self, keys, args)


@dataclass(frozen=True)
class Call:
    """One call of a Lua script: its keys and arguments, built by the script's own builder function."""

    script: Lua
    keys: list[str]
    args: list[Any]


def script(c: Call) -> Cmd:
    """A script call as one command of a plan's round trip. EVAL, not EVALSHA: a pipeline cannot load a script
    Redis does not know (after a restart) and retry; Redis caches the compiled script by its SHA1 either way."""
    return cmd("eval", c.script.source, len(c.keys), *c.keys, *c.args)


def scripts(calls: list[Call]) -> Plan[list[Any]]:
    """Several script calls in one round trip, run in their order (each one atomic, not all of them together)."""
    replies = yield [script(c) for c in calls]
    return replies


def call(client: Any, c: Call) -> Any:
    """Run a script call with a sync client."""
    try:
        return client.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
    except NoScriptError:
        client.script_load(c.script.source)
        return client.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)


async def acall(client: Any, c: Call) -> Any:
    """Run a script call with an asyncio client."""
    try:
        return await client.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
    except NoScriptError:
        await client.script_load(c.script.source)
        return await client.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
