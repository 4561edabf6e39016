"""`grape serve`: run the gateway with uvicorn."""

from __future__ import annotations

import argparse
import os

import uvicorn

from grape.settings import get_settings
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
    except ValueError as exc:
        p.error(str(exc))
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
        )
    else:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0
