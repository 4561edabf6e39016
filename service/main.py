"""`grape serve`: run the gateway with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from grape.settings import get_settings
from service.app import create_app


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    p = argparse.ArgumentParser(prog="grape serve", description="Run the HTTP gateway.")
    p.add_argument("--host", default=settings.host)
    p.add_argument("--port", type=int, default=settings.port)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    settings = settings.model_copy(update={"host": args.host, "port": args.port})
    try:
        settings.check_exposure()
    except ValueError as exc:
        p.error(str(exc))
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0
