"""`grape serve`: run the gateway with uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from grape.settings import Settings, get_settings
from grape.tenancy import quotas_of
from service.app import create_app


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    p = argparse.ArgumentParser(prog="grape serve", description="Run the HTTP gateway.")
    p.add_argument("--host", default=settings.host)
    p.add_argument("--port", type=int, default=settings.port)
    p.add_argument("--log-level", default="info")
    p.add_argument("--workers", type=int, default=1, help="gateway processes (uvicorn workers) on this port")
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
    """uvicorn's connection limits. The h11 parser refuses a request head past GRAPE_MAX_HEADER_BYTES (400,
    connection closed) instead of buffering it (uvicorn's httptools parser has no such limit); a
    connection that has not sent a whole head within GRAPE_HEADER_TIMEOUT_S is closed (BoundedH11Protocol);
    idle keep-alive connections are closed after GRAPE_KEEP_ALIVE_S; past GRAPE_MAX_CONNECTIONS open
    connections or tasks, new requests get a 503."""
    return {
        "http": BoundedH11Protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
    }


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for the request head: a connection must send a complete
    head within `header_timeout_s` of opening, or of its previous answer, else it is closed. Without it a
    client could hold a connection (and its buffered head) forever by sending a byte at a time. A request
    whose head has arrived is never cut by this: its body and answer take as long as they take."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # read here rather than passed in: with --workers, each process builds its protocol from the environment
        self.header_timeout = get_settings().header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

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
