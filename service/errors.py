"""Errors the service functions raise; the app turns them into HTTP answers."""

from __future__ import annotations

from typing import Any


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


class Unauthorized(ApiError):
    status = 401


class Busy(ApiError):
    """Backpressure: the queue is past its limit, or Redis is full. The client retries after `retry_after`."""

    status = 429

    def __init__(self, message: str, retry_after: int = 5, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
