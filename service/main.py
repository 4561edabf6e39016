"""`grape serve`: run the gateway with uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from grape.settings import Settings, get_settings
from grape.tenancy import quotas_of
from service.app import create_app


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grape serve", description="Run the HTTP gateway.")
    p.add_argument("--host", default=settings.host)
    p.add_argument("--port", type=int, default=settings.port)
    p.add_argument("--log-level", default="info")
    p.add_argument("--workers", type=int, default=1, help="gateway processes (uvicorn workers) on this port")
    return p


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    p = build_parser(settings)
    args = p.parse_args(argv)
    settings = settings.model_copy(update={"host": args.host, "port": args.port})
    try:
        settings.check_exposure()
        quotas_of(settings)  # GRAPE_TENANTS_FILE: an unknown quota or tenant name stops the start, named
    except ValueError as exc:
        p.error(str(exc))
    limits = server_limits(settings)
    if args.workers > 1:
        # each process builds its own app from the environment (settings are read there again)
        os.environ["GRAPE_HOST"], os.environ["GRAPE_PORT"] = args.host, str(args.port)
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            **limits,
        )
    else:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level, **limits)
    return 0


def server_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's connection limits. A request head past GRAPE_MAX_HEADER_BYTES is refused (431, connection
    closed): h11 stops buffering a head that grows past it (uvicorn's httptools parser has no such limit),
    and BoundedH11Protocol refuses a complete head past it, which h11 lets through when it arrives in one
    read; a connection that has not sent a whole head within GRAPE_HEADER_TIMEOUT_S is closed;
    idle keep-alive connections are closed after GRAPE_KEEP_ALIVE_S; past GRAPE_MAX_CONNECTIONS open
    connections or tasks, new requests get a 503."""
    return {
        "http": BoundedH11Protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
    }


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus two bounds on the request head.

    Size: h11's `max_incomplete_event_size` bounds only a head still incomplete in its buffer, so a head
    that arrives whole in one read (one write of 100 KB on a fast link) would pass at any size. Every
    parsed head is measured before any route sees it (`HeadLimit`, wrapped around the whole app), and an
    incomplete one past the limit gets the same 431 instead of h11's bare 400.

    Time: a connection must send a complete head within `header_timeout_s` of opening, or of its previous
    answer, else it is closed. Without it a client could hold a connection (and its buffered head) forever
    by sending a byte at a time. A request whose head has arrived is never cut by this: its body and answer
    take as long as they take."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # read here rather than passed in: with --workers, each process builds its protocol from the environment
        settings = get_settings()
        self.header_timeout = settings.header_timeout_s
        self.max_header_bytes = settings.max_header_bytes
        self.app = HeadLimit(self.app, self.max_header_bytes)
        self._head_timer: asyncio.TimerHandle | None = None

    def send_400_response(self, msg: str) -> None:
        unparsed, _ = self.conn.trailing_data
        if len(unparsed) <= self.max_header_bytes:
            super().send_400_response(msg)
            return
        # h11 gave up on a head that grew past the limit: say which limit, as HeadLimit does
        event = h11.Response(status_code=431, headers=[*TOO_LARGE_HEADERS], reason=b"Request Header Fields Too Large")
        self.transport.write(self.conn.send(event) or b"")
        self.transport.write(self.conn.send(h11.Data(data=too_large_body(self.max_header_bytes))) or b"")
        self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout, self.cycle)

    def _head_timeout(self, cycle_when_armed: object) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if self.cycle is cycle_when_armed and idle and not self.transport.is_closing():
            self.transport.close()


TOO_LARGE_HEADERS = ((b"content-type", b"application/json"), (b"connection", b"close"))


def too_large_body(limit: int) -> bytes:
    return b'{"detail":"request head (request line and headers) larger than GRAPE_MAX_HEADER_BYTES (%d bytes)"}' % limit


def head_size(scope: Scope) -> int:
    """The request head's size as parsed: request line and every header line, CRLFs included (what the
    client sent, less any optional whitespace h11 stripped around header values)."""
    target = len(scope["raw_path"]) + (len(scope["query_string"]) + 1 if scope["query_string"] else 0)
    line = len(scope["method"]) + 1 + target + 1 + len("HTTP/") + len(scope["http_version"]) + 2
    return line + sum(len(name) + 2 + len(value) + 2 for name, value in scope["headers"]) + 2


class HeadLimit:
    """Refuses a request whose head is larger than `limit` with 431 and closes the connection, before the
    app (every route, the middlewares) sees it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or head_size(scope) <= self.limit:
            await self.app(scope, receive, send)
            return
        body = too_large_body(self.limit)
        headers = [*TOO_LARGE_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 431, "headers": headers})
        await send({"type": "http.response.body", "body": body})
