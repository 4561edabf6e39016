"""Errors the service functions raise; the app turns them into HTTP answers."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Send

from grape.store.errors import shown  # noqa: F401  (re-exported: the service's messages quote values alike)


class ApiError(Exception):
    status = 400

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class NotFound(ApiError):
    status = 404


class BadRequest(ApiError):
    status = 400


class Unprocessable(ApiError):
    status = 422


class Conflict(ApiError):
    """The request is valid but the resource is not in a state that allows it (e.g. a dataset still scoring)."""

    status = 409


class TooLarge(ApiError):
    status = 413


class UnsupportedType(ApiError):
    status = 415


class Busy(ApiError):
    """Backpressure: the queue is past its limit, or Redis is full. The client retries after `retry_after`."""

    status = 429

    def __init__(self, message: str, retry_after: int = 5, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class SafeJSONResponse(JSONResponse):
    """An error answer that always encodes: text that is not valid UTF-8 (a lone surrogate) is replaced,
    never a reason for a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "replace")


async def send_error(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """An error answer from ASGI middleware (below FastAPI): `{"detail": ...}` as JSON."""
    body = SafeJSONResponse({"detail": detail}).body
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
